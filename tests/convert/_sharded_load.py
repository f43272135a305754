"""Run in a subprocess with 8 fake CPU devices (tests/convert/test_convert_io.py): a checkpoint
loaded straight into FSDP x tensor shardings (train.sharding's rules) equals the one-device
load, array for array, and every array sits in its sharding; prints JSON."""

from __future__ import annotations

import json
import sys
import tempfile

import jax
import numpy as np
from flax import nnx

from train.sharding import DEFAULT_RULES, make_mesh, param_shardings
from ttt_jax.convert import abstract_params, config_from_hf, export_pretrained, load_pretrained
from ttt_jax.models import LM

hf = json.loads(sys.argv[1])
config = config_from_hf(hf, precision="fp32")
path = tempfile.mkdtemp()
export_pretrained(config, LM(config, rngs=nnx.Rngs(0)), path, max_shard_size=40_000)
_, single = load_pretrained(path)

mesh = make_mesh((1, 4, 2))  # fsdp 4 over `embed`, tensor 2 over heads / mlp / vocab
abstract_model = nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(0)))
logical = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(abstract_model, nnx.Param)))
shardings = param_shardings(logical, abstract_params(config), DEFAULT_RULES, mesh)
_, sharded = load_pretrained(path, shardings=shardings)

flat_single = jax.tree_util.tree_leaves_with_path(single)
flat_sharded = jax.tree.leaves(sharded)
flat_want = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
equal = all(
    np.array_equal(np.asarray(a), np.asarray(b))
    for (_, a), b in zip(flat_single, flat_sharded, strict=True)
)
in_place = all(
    x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(flat_sharded, flat_want, strict=True)
)
w_q = sharded["groups"]["blocks"][0]["mixer"]["W_q"]
print(
    json.dumps(
        {
            "devices": jax.device_count(),
            "leaves": len(flat_sharded),
            "equal": equal,
            "in_place": in_place,
            "split_leaves": sum(
                len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
                for x in flat_sharded
            ),
            "w_q_shape": list(w_q.shape),
            "w_q_spec": [str(a) for a in w_q.sharding.spec],
            "w_q_shard": list(w_q.addressable_shards[0].data.shape),
            "embed_spec": [str(a) for a in sharded["embed"].sharding.spec],
        }
    )
)

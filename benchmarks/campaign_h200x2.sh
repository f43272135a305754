#!/usr/bin/env bash
# The 2-GPU campaign recorded in RESULTS.md ("Two H200s"), run on `nvidia-h200-x2` from the repo
# root with PYTHONPATH=. and OUT set to a log folder. One stage per device call (each stays
# under the device tool's 10-minute limit):
#   bash benchmarks/campaign_h200x2.sh lm     # 125m: 1 GPU, data=2, fsdp=2 (T=8192)
#   bash benchmarks/campaign_h200x2.sh lact   # lact-760m: 1 GPU, fsdp=2, data=2, tensor=2
#   bash benchmarks/campaign_h200x2.sh lact2  # lact-760m: tensor=2 at batch 2, preset remat
# Every run is a fresh `python -m train` process, so each peak is its own.
set -uo pipefail
: "${OUT:?set OUT to a folder for the logs}"
stage=${1:?stage: lm or lact}
bench() {  # name, then bench_lm.py arguments
  local name=$1
  shift
  echo "=== $name" | tee -a "$OUT/campaign.txt"
  timeout 240 python benchmarks/bench_lm.py --run-root /tmp/runs --out "$OUT/$name.json" "$@" \
    >"$OUT/$name.log" 2>&1
  echo "exit $?" >>"$OUT/campaign.txt"
  grep -E "^\| (125m|lact)" "$OUT/$name.log" | tee -a "$OUT/campaign.txt"
}
case $stage in
  lm)
    lm=(--presets 125m --seq 8192 --steps 30 --warmup 5)
    CUDA_VISIBLE_DEVICES=0 bench h200x2_lm_1gpu "${lm[@]}" --batch-size 4
    bench h200x2_lm_dp2 "${lm[@]}" --batch-size 8 -- --mesh.data 2
    bench h200x2_lm_fsdp2 "${lm[@]}" --batch-size 8 -- --mesh.data 1 --mesh.fsdp 2
    ;;
  lact)
    lact=(--presets lact-760m --steps 8 --warmup 3)
    full=(--model.block-remat full)
    for t in 16384 32768; do
      CUDA_VISIBLE_DEVICES=0 bench "h200x2_lact760m_1gpu_t$t" "${lact[@]}" --seq $t \
        --batch-size 1 -- "${full[@]}"
      bench "h200x2_lact760m_fsdp2_t$t" "${lact[@]}" --seq $t --batch-size 2 -- "${full[@]}" \
        --mesh.data 1 --mesh.fsdp 2
    done
    bench h200x2_lact760m_dp2_t16384 "${lact[@]}" --seq 16384 --batch-size 2 -- "${full[@]}" \
      --mesh.data 2
    bench h200x2_lact760m_tp2_t16384 "${lact[@]}" --seq 16384 --batch-size 1 -- "${full[@]}" \
      --mesh.data 1 --mesh.tensor 2
    ;;
  lact2)
    lact=(--presets lact-760m --steps 8 --warmup 3)
    bench h200x2_lact760m_fsdp2_t32768 "${lact[@]}" --seq 32768 --batch-size 2 -- \
      --model.block-remat full --mesh.data 1 --mesh.fsdp 2
    bench h200x2_lact760m_tp2_t16384 "${lact[@]}" --seq 16384 --batch-size 1 -- \
      --model.block-remat full --mesh.data 1 --mesh.tensor 2
    bench h200x2_lact760m_tp2_b2_t16384 "${lact[@]}" --seq 16384 --batch-size 2 -- \
      --model.block-remat full --mesh.data 1 --mesh.tensor 2
    # the preset's own block remat (dots_no_batch) at both lengths
    for t in 16384 32768; do
      bench "h200x2_lact760m_fsdp2_dnb_t$t" "${lact[@]}" --seq $t --batch-size 2 -- \
        --mesh.data 1 --mesh.fsdp 2
    done
    ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
# one archive: the device tool brings back only a few files per call
tar -czf "/tmp/campaign_$stage.tgz" -C "$OUT" --exclude campaign.txt . && mv "/tmp/campaign_$stage.tgz" "$OUT/"
find "$OUT" -name 'h200x2_*' -delete
cat "$OUT/campaign.txt"

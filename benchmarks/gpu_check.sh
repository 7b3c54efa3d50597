#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and a CUDA build of torch: builds the extension with its CUDA
# kernels against that torch, runs the CUDA tests, then times every op against its baseline and
# prints a table last (logs and the table in OUTDIR). Sized to fit one 10-minute run
# on an H100 (about 2 minutes of build on 16 cores).
#
#   benchmarks/gpu_check.sh [OUTDIR]      (default OUTDIR: /tmp/fastmerge-gpu)
#   FASTMERGE_KEEP_CXX=1 benchmarks/gpu_check.sh   keeps $CXX (default: /usr/bin/g++ where it exists)
#   SKIP_TIMINGS=1 TESTS_TIMEOUT=300 benchmarks/gpu_check.sh   build and tests only
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-/tmp/fastmerge-gpu}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
stamp() { echo "== $(date +%T) $*"; }

stamp "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

stamp "build"
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$NVCC")")")}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
export MAX_JOBS=${MAX_JOBS:-$(nproc)} FASTMERGE_CUDA=1
# The lent H100's default CXX (/opt/gcc/bin/g++) links libstdc++ statically, which makes every
# exception of the library crash (setup.py refuses it); its system g++ links it dynamically.
if [ -z "${FASTMERGE_KEEP_CXX:-}" ] && [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++; fi
rm -f fastmerge/_C*.so
if ! $PY setup.py -q build_ext --inplace > "$OUTDIR/build.log" 2>&1; then
  tail -40 "$OUTDIR/build.log"; echo "BUILD FAILED"; exit 1
fi
$PY -c "import fastmerge, torch; fastmerge._ext.load(); print(torch.ops.fastmerge.build_info())"
# which C++ runtime and unwinder the library links and the process actually loads: on the lent H100
# a build whose libstdc++ was linked statically crashed at every exception (benchmarks/RESULTS.md);
# gpu_throw_probe.sh below checks that exceptions raise
echo "compiler: ${CXX:-$(command -v c++)}"
ldd fastmerge/_C*.so | grep -E "stdc\+\+|gcc_s|gomp" || true
$PY -c "import fastmerge, torch; fastmerge._ext.load(); print('\n'.join(sorted({l.split()[-1] for l in open('/proc/self/maps') if 'libstdc' in l or 'libgcc_s' in l})))"

# the exception probe (mostly compiling on the host) runs beside the GPU tests
benchmarks/gpu_throw_probe.sh "$OUTDIR" > "$OUTDIR/probe.log" 2>&1 &
probe=$!

stamp "tests"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# in 4 worker processes when pytest-xdist is there: a crashing test then fails alone
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 4")
# and each worker with a quarter of the cores: four workers of nproc OpenMP threads each ran the
# pipeline tests' small CPU training steps so oversubscribed that they did not finish in 4 minutes
[ -n "$XDIST" ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / 4 > 0 ? $(nproc) / 4 : 1 ))}
timeout ${TESTS_TIMEOUT:-300} $PY -m pytest -q -rfE --tb=short -p no:cacheprovider --durations=8 $XDIST tests/cuda > "$OUTDIR/tests.log" 2>&1
tests_rc=$?
tail -30 "$OUTDIR/tests.log"

stamp "exception probe"
wait $probe
cat "$OUTDIR/probe.log"

if [ -n "${SKIP_TIMINGS:-}" ]; then stamp "done (CUDA tests exit code $tests_rc; timings skipped)"; exit $tests_rc; fi
stamp "timings"
timeout ${TIMINGS_TIMEOUT:-420} $PY benchmarks/gpu_timings.py --out "$OUTDIR/gpu_table.md" > "$OUTDIR/timings.log" 2>&1
timings_rc=$?
grep -v "^|" "$OUTDIR/timings.log" | tail -15
cat "$OUTDIR/gpu_table.md" 2>/dev/null
stamp "done (CUDA tests exit code $tests_rc, timings exit code $timings_rc)"
exit $tests_rc

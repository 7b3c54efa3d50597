#!/usr/bin/env bash
# Do exceptions thrown by the compiled library raise in Python on this machine? On the lent GPU
# machine they crashed (SIGSEGV) until the cause was found with this probe: its default compiler
# linked libstdc++ statically (benchmarks/RESULTS.md). Run by gpu_check.sh after the build: it tells
# the toolchain, throws from a minimal torch op library built with each compiler found (with and
# without -fopenmp, as ours links) and from our library, and takes a backtrace of a crash with
# cuda-gdb (the only debugger there). Everything it finds is printed; it never fails the check.
#
#   benchmarks/gpu_throw_probe.sh OUTDIR
set -u
cd "$(dirname "$0")/.."
OUTDIR=${1:-/tmp/fastmerge-gpu}
PY=${PYTHON:-python3}
WORK=$(mktemp -d)

echo "-- toolchain"
for c in c++ g++ /usr/bin/g++ /opt/gcc/bin/g++; do
  p=$(command -v "$c" 2>/dev/null) && echo "$c -> $(readlink -f "$p"): $("$p" --version | head -1)"
done
echo "CXX=${CXX:-} LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
printf 'int main(){try{throw 1;}catch(int){return 0;}return 1;}' > "$WORK/t.cpp"
c++ "$WORK/t.cpp" -o "$WORK/t" && "$WORK/t"; echo "plain C++ throw/catch with c++: exit $?"

echo "-- torch's own exception"
$PY -c "import torch
try: torch.zeros(2, 3) @ torch.zeros(2, 3)
except RuntimeError: print('torch raises: ok')"; echo "exit $?"

echo "-- minimal op libraries"
cat > "$WORK/probe.cpp" <<'EOF'
#include <ATen/core/Tensor.h>
#include <torch/library.h>
at::Tensor throw_it(const at::Tensor& x) { TORCH_CHECK(false, "probe: thrown on purpose"); return x; }
TORCH_LIBRARY(fmprobe, m) { m.def("throw_it(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(fmprobe, CPU, m) { m.impl("throw_it", &throw_it); }
EOF
read -r TI TL ABI < <($PY -c "import torch, os; from torch.utils import cpp_extension as c
print(c.include_paths()[0], c.library_paths()[0], int(torch._C._GLIBCXX_USE_CXX11_ABI))")
FLAGS="-O2 -shared -fPIC -std=c++20 -w -D_GLIBCXX_USE_CXX11_ABI=$ABI -I$TI -I$TI/torch/csrc/api/include -L$TL -lc10 -ltorch_cpu -Wl,-rpath,$TL"
variants=()
for c in c++ /usr/bin/g++; do
  command -v "$c" > /dev/null || continue
  tag=$([ "$c" = c++ ] && echo default || echo usr_bin_gpp)
  $c "$WORK/probe.cpp" $FLAGS -o "$WORK/probe_${tag}.so" & variants+=("probe_${tag}.so")
  $c "$WORK/probe.cpp" $FLAGS -fopenmp -o "$WORK/probe_${tag}_omp.so" & variants+=("probe_${tag}_omp.so")
done
wait
for v in "${variants[@]}"; do
  [ -f "$WORK/$v" ] || { echo "$v: did not build"; continue; }
  $PY -c "import torch; torch.ops.load_library('$WORK/$v')
try: torch.ops.fmprobe.throw_it(torch.zeros(1))
except RuntimeError as e: print('raises ok')" > "$WORK/out" 2>&1
  echo "$v: exit $? $(tail -1 "$WORK/out")"
  ldd "$WORK/$v" | grep -E "stdc|gcc_s|gomp" | sed 's/^/    /'
done

echo "-- our library: a CPU op's TORCH_CHECK"
THROW="import torch, fastmerge; fastmerge._ext.load()
try: torch.ops.fastmerge.linear_assignment(torch.zeros(3))
except RuntimeError as e: print('raises ok')"
$PY -c "$THROW"; rc=$?; echo "exit $rc"
if [ $rc -ne 0 ] && command -v cuda-gdb > /dev/null; then
  echo "-- backtrace (cuda-gdb)"
  timeout 150 cuda-gdb -q -batch -ex "set pagination off" -ex run -ex bt -ex "info registers rip" \
    -ex "x/6i \$pc" --args $PY -c "$THROW" > "$OUTDIR/throw_gdb.log" 2>&1
  grep -E "^#|SIGSEGV|signal|=>" "$OUTDIR/throw_gdb.log" | head -40
fi
rm -rf "$WORK"
exit 0

#!/usr/bin/env bash
# bench/run.sh [--quick] [--c-only] - build csrc/ standalone with -O2 into
# bench/bin/ and run the C benchmarks, then the Python ones (run_py.py).  Each
# prints lines "name<TAB>value<TAB>unit"; what each measures (and what it does
# not) is in the comment at the top of its source.  --quick shrinks every
# benchmark (the C part then takes ~10 s); --c-only skips the Python part.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
csrc="$here/../csrc"
bin="$here/bin"
quick=()
c_only=0
for arg in "$@"; do
    case "$arg" in
        --quick) quick=(--quick) ;;
        --c-only) c_only=1 ;;
        *) echo "usage: $0 [--quick] [--c-only]" >&2; exit 2 ;;
    esac
done

# The benchmark list: bench/c/bench_<name>.c, run in this order.
BENCHES=(ring wake seg)

CC="${CC:-cc}"
CFLAGS=(-std=gnu11 -O2 -Wall -Wextra -Werror -I"$csrc" -I"$here/c")
LIBS=(-lpthread)
[[ "$(uname)" == Linux ]] && LIBS+=(-lrt)

mkdir -p "$bin"
for b in "${BENCHES[@]}"; do
    "$CC" "${CFLAGS[@]}" -o "$bin/bench_$b" "$here/c/bench_$b.c" "$csrc"/*.c "${LIBS[@]}"
done
for b in "${BENCHES[@]}"; do
    "$bin/bench_$b" "${quick[@]}"
done

# The Python benchmarks (shardc vs its peers): bench/run_py.py runs its list
# and writes bench/out/latest.md.
if [[ $c_only == 0 ]]; then
    "${PYTHON:-python}" "$here/run_py.py" "${quick[@]}"
fi

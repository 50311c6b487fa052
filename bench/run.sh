#!/usr/bin/env bash
# bench/run.sh [--quick] [--python] [--c-only] - build csrc/ standalone with
# -O2 into bench/bin/ and run the C benchmarks, then the Python ones (shardc
# side by side with its peers, run_py.py -> bench/out/latest.md).  Each prints
# lines "name<TAB>value<TAB>unit"; what each measures (and what it does not)
# is in the comment at the top of its source.
#
#   bench/run.sh                 everything, full size (about 20 minutes)
#   bench/run.sh --quick         the C benchmarks, shrunk: well under a minute
#   bench/run.sh --quick --python  also the Python benchmarks, shrunk (minutes)
#   bench/run.sh --c-only        the C benchmarks, full size
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
csrc="$here/../csrc"
bin="$here/bin"
quick=()
c_only=0
python=0
for arg in "$@"; do
    case "$arg" in
        --quick) quick=(--quick) ;;
        --c-only) c_only=1 ;;
        --python) python=1 ;;
        *) echo "usage: $0 [--quick] [--python] [--c-only]" >&2; exit 2 ;;
    esac
done
# --quick alone is the one-minute C check; the Python list joins on request.
if [[ ${#quick[@]} -gt 0 && $python == 0 ]]; then
    c_only=1
fi

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

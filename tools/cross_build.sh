#!/usr/bin/env bash
# Cross builds of csrc/ for the platforms this machine is not (issue #19).
#
#   macos        csrc/*.c compiled for aarch64-macos and x86_64-macos with `zig cc`
#                (PyPI `ziglang`), with the native wait and with the portable one
#                (-DSHARDC_PORTABLE_WAIT=1), under -Wall -Wextra -Werror, then linked
#                into a dylib against zig's macOS libSystem stubs (every API we call
#                must exist there).  Compile and link only: nothing runs, and the
#                cffi wrapper is not built (it needs a macOS pyconfig.h).
#   arm64-linux  the C unit tests (tests/c/test_*.c + csrc/*.c) cross-compiled for
#                aarch64 with Debian's gcc-aarch64-linux-gnu (-Werror; dynamic, run
#                against the cross libc in QEMU_LD_PREFIX), plain
#                and with the portable wait, and run under qemu-aarch64 (qemu-user).
#                A test qemu-user cannot run is skipped with its reason printed
#                (QEMU_SKIP below), never silently.
#
# Usage: tools/cross_build.sh [macos] [arm64-linux]    (no argument: both)
# Env:   ZIG (default "python3 -m ziglang"), CROSS_CC (default aarch64-linux-gnu-gcc),
#        QEMU (default qemu-aarch64), OUT (default build/cross).
# Exit status: 0 all built (and run) clean; 1 a build, warning or test failed;
# 2 a tool is missing.  Any compiler output at all counts as a failure.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

ZIG=${ZIG:-python3 -m ziglang}
CROSS_CC=${CROSS_CC:-aarch64-linux-gnu-gcc}
QEMU=${QEMU:-qemu-aarch64}
# The arm64 libc the cross compiler links against (Debian's libc6-arm64-cross):
# the tests are linked dynamically (a static link warns about dlopen in
# csrc/kernel.c, and test_kern dlopens a library) and qemu loads them from here.
export QEMU_LD_PREFIX=${QEMU_LD_PREFIX:-/usr/aarch64-linux-gnu}
OUT=${OUT:-build/cross}
WARN=(-std=gnu11 -Wall -Wextra -Werror -Icsrc)
VARIANTS=(native portable)

# Tests (binary name without variant suffix) that qemu-user cannot run, with the
# reason printed when they are skipped.  Keep this list short and specific.
declare -A QEMU_SKIP=(
    [test_heap]="its checks count page faults, and under qemu-user they are qemu's own host faults (a trimmed heap refaulted 0 times in the dynamic link, 32 in the static one): the heap policy is tested natively"
)

failed=0
fail() {
    echo "FAIL $*"
    failed=1
}

# Run a compiler command; its output (a warning that -Werror did not turn into an
# error, a linker note) counts as a failure too.
compile() {
    local log
    log=$("$@" 2>&1)
    local rc=$?
    if [ $rc -ne 0 ] || [ -n "$log" ]; then
        printf '%s\n' "$log"
        fail "(rc $rc): $*"
        return 1
    fi
    return 0
}

variant_flags() {
    [ "$1" = portable ] && echo "-DSHARDC_PORTABLE_WAIT=1"
}

build_macos() {
    if ! $ZIG version >/dev/null 2>&1; then
        echo "MISSING zig ($ZIG): python3 -m pip install ziglang"
        return 2
    fi
    echo "== macOS: zig $($ZIG version), csrc/*.c, -Wall -Wextra -Werror"
    local target variant src obj dir
    for target in aarch64-macos x86_64-macos; do
        for variant in "${VARIANTS[@]}"; do
            dir=$OUT/$target-$variant
            mkdir -p "$dir"
            local objs=()
            for src in csrc/*.c; do
                obj=$dir/$(basename "${src%.c}").o
                # shellcheck disable=SC2046
                compile $ZIG cc -target "$target" "${WARN[@]}" -O2 $(variant_flags "$variant") \
                    -c "$src" -o "$obj" && objs+=("$obj")
            done
            # Link: an API missing from macOS's libSystem fails here, not at a user's import.
            compile $ZIG cc -target "$target" -shared -o "$dir/libshardc.dylib" "${objs[@]}" &&
                echo "ok   $target ($variant wait): ${#objs[@]} objects, libshardc.dylib linked"
        done
    done
    return 0
}

build_arm64_linux() {
    local missing=()
    command -v "$CROSS_CC" >/dev/null 2>&1 || missing+=("$CROSS_CC")
    command -v "$QEMU" >/dev/null 2>&1 || missing+=("$QEMU")
    if [ ${#missing[@]} -gt 0 ]; then
        echo "MISSING ${missing[*]}: apt-get install gcc-aarch64-linux-gnu qemu-user"
        return 2
    fi
    echo "== arm64 Linux: $($CROSS_CC --version | head -n1); $($QEMU --version | head -n1)"
    local dir=$OUT/aarch64-linux test name variant exe bin log rc src
    mkdir -p "$dir"
    # csrc/ is compiled once per variant; each test is linked against those
    # objects (compiling csrc/ into every test took most of this step's time).
    # SHARDC_TEST_HOOKS: the test-only hooks tests/c/Makefile also enables.
    declare -A objs=()
    for variant in "${VARIANTS[@]}"; do
        mkdir -p "$dir/obj-$variant"
        local list=()
        for src in csrc/*.c; do
            # shellcheck disable=SC2046
            compile "$CROSS_CC" "${WARN[@]}" -DSHARDC_TEST_HOOKS -O2 -g $(variant_flags "$variant") \
                -c "$src" -o "$dir/obj-$variant/$(basename "${src%.c}").o" && list+=("$dir/obj-$variant/$(basename "${src%.c}").o")
        done
        objs[$variant]="${list[*]}"
    done
    # Build every test, then run them under qemu, $JOBS at a time (logs in
    # files), then report in a fixed order.
    local jobs=${JOBS:-$(nproc 2>/dev/null || echo 2)} runs=()
    for test in tests/c/test_*.c; do
        name=$(basename "${test%.c}")
        for variant in "${VARIANTS[@]}"; do
            exe=$name$([ "$variant" = portable ] && echo _portable)
            bin=$dir/$exe
            # shellcheck disable=SC2046,SC2086
            compile "$CROSS_CC" "${WARN[@]}" -DSHARDC_TEST_HOOKS -O2 -g $(variant_flags "$variant") \
                -o "$bin" "$test" ${objs[$variant]} -lpthread -lrt || continue
            if [ -n "${QEMU_SKIP[$name]:-}" ]; then
                echo "SKIP $exe under qemu: ${QEMU_SKIP[$name]}"
                continue
            fi
            while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do
                wait -n || true
            done
            (
                timeout 240 "$QEMU" "$bin" >"$bin.log" 2>&1
                echo $? >"$bin.rc"
            ) &
            runs+=("$exe")
        done
    done
    wait
    for exe in "${runs[@]}"; do
        bin=$dir/$exe
        log=$(cat "$bin.log")
        rc=$(cat "$bin.rc")
        if [ "$rc" -ne 0 ] || ! grep -q '^ok 1 -' <<<"$log"; then
            printf '%s\n' "$log" | tail -n 30
            fail "$exe under qemu-aarch64 (exit $rc)"
        else
            # Skips a test reports itself (e.g. "# ptrace not permitted") stay visible.
            echo "ok   $exe under qemu-aarch64: $(grep -c '^ok ' <<<"$log") tests$(grep '^#' <<<"$log" | sed 's/^#/;/' | tr -d '\n')"
        fi
    done
    return 0
}

parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(macos arm64-linux)
missing=0
for part in "${parts[@]}"; do
    case $part in
    macos) build_macos || missing=1 ;;
    arm64-linux) build_arm64_linux || missing=1 ;;
    *)
        echo "unknown part: $part (macos, arm64-linux)"
        exit 2
        ;;
    esac
done
[ $failed -ne 0 ] && exit 1
[ $missing -ne 0 ] && exit 2
echo "== cross builds clean"
exit 0

#!/usr/bin/env bash
# Build the kit the GPU machine needs (it has no Rust and no network) into a git-ignored folder:
#
#   bash scripts/gpu/build_wheel.sh --reference ~/src/PiD        # ~30 min of nvcc on a cold target/
#
#   gpu-kit/wheels/pid_native-*.whl.xz  the abi3 CUDA wheel: candle's kernels as sm_80 PTX (the driver
#                                       JIT-compiles them for newer GPUs), ours as sm_90 code + sm_80 PTX
#   gpu-kit/wheels/*.whl.xz             the dependencies the GPU machine lacks (kit.py deps)
#   gpu-kit/sanitizer/*.whl.xz          compute-sanitizer (NVIDIA's PyPI wheel), unless --no-sanitizer
#                                       (every wheel is stored xz-compressed: kit.py pack says why)
#   gpu-kit/reference.tar.gz            the upstream reference's pid/ package, unless --no-reference
#   gpu-kit/kit.json                    what was built, from which commit, and the sizes
#
# Then on the GPU machine, from the repository root: OUT=<dir> bash scripts/gpu/device_check.sh
# (the device tool: carry ["gpu-kit"]). Fails if the working tree plus the kit exceed --limit-mib.
#
# Options:
#   --reference DIR     checkout of github.com/nv-tlabs/PiD (default $PID_REFERENCE)
#   --no-reference      carry no reference (device_check then records that step as failed)
#   --wheel FILE        carry this wheel instead of building one (the CI rehearsal: a CPU wheel)
#   --python-version V  the GPU machine's Python, for the dependency wheels (default 3.12)
#   --no-sanitizer      leave compute-sanitizer out (4.4 MiB packed)
#   --sass LIST         GPU architectures our kernels are also compiled for as machine code (default 90)
#   --out DIR           default gpu-kit
#   --limit-mib N       default 60
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
cd "$ROOT"

reference=${PID_REFERENCE:-}
no_reference=0
wheel=
python_version=3.12
sanitizer=1
sass=90
out=$ROOT/gpu-kit
limit=60
while [[ $# -gt 0 ]]; do
    case $1 in
        --reference) reference=$2; shift 2 ;;
        --no-reference) no_reference=1; shift ;;
        --wheel) wheel=$(realpath "$2"); shift 2 ;;
        --python-version) python_version=$2; shift 2 ;;
        --no-sanitizer) sanitizer=0; shift ;;
        --sass) sass=$2; shift 2 ;;
        --out) out=$(realpath -m "$2"); shift 2 ;;
        --limit-mib) limit=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [[ $no_reference == 0 ]]; then
    if [[ -z $reference ]]; then
        echo "error: name the upstream checkout with --reference DIR (git clone https://github.com/nv-tlabs/PiD)" \
             "or pass --no-reference" >&2
        exit 2
    fi
    if [[ ! -f $reference/pid/_src/networks/pid_net.py ]]; then
        echo "error: $reference is not a checkout of nv-tlabs/PiD (no pid/_src/networks/pid_net.py)" >&2
        exit 2
    fi
fi
if [[ -n $wheel && ! -f $wheel ]]; then
    echo "error: --wheel $wheel does not exist" >&2
    exit 2
fi

step() { echo "=== [build_wheel] $*"; }
T0=$(date +%s)
rm -rf "$out"
mkdir -p "$out/wheels"

# The toolkit venv CI's compile check uses, plus the libraries the link needs.
cuda_toolkit() {
    local tk="$ROOT/target/cuda-toolkit"
    [[ -x $tk/bin/pip ]] || python3 -m venv "$tk"
    "$tk/bin/pip" install -q -r "$HERE/toolkit.txt" -r "$HERE/link-libs.txt"
    "$tk/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))'
}

# The wheels ship only versioned sonames and no wheel ships the driver: give the linker unversioned
# names, and a libcuda.so.1 stub. The stub must define a symbol the extension uses, or
# --as-needed drops it and the extension would not record that it needs the driver.
link_stubs() {
    local cuda=$1 stubs=$1/lib/stubs
    mkdir -p "$stubs"
    local lib
    for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libnvrtc.so.13 libcurand.so.10; do
        ln -sf "../$lib" "$stubs/${lib%.so.*}.so"
    done
    printf 'int cuInit(unsigned int f) { return 0; }\nint cuDriverGetVersion(int *v) { return 0; }\n' \
        >"$stubs/libcuda.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stubs/libcuda.so" "$stubs/libcuda.c"
}

# The extension inside a wheel, unpacked into a temporary folder.
extension_of() {
    local tmp
    tmp=$(mktemp -d)
    unzip -q -o "$1" 'pid_native/_native*.so' -d "$tmp"
    ls "$tmp"/pid_native/_native*.so
}

# The built CUDA extension must record the driver and the libraries candle calls as dependencies
# (DT_NEEDED); the linker drops the ones nothing calls (cuBLASLt, which cuBLAS loads, and NVRTC).
check_cuda_needed() {
    local needed lib
    needed=$(readelf -d "$1" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | sort | tr '\n' ' ')
    echo "extension needs: $needed"
    for lib in libcuda.so.1 libcudart.so.13 libcublas.so.13 libcurand.so.10; do
        if [[ " $needed " != *" $lib "* ]]; then
            echo "error: the built extension does not record $lib (DT_NEEDED): the link went wrong" >&2
            return 1
        fi
    done
}

if [[ -n $wheel ]]; then
    step "carrying $wheel (not building)"
    cp "$wheel" "$out/wheels/"
else
    step "CUDA toolkit (scripts/gpu/toolkit.txt, link-libs.txt)"
    cuda=$(cuda_toolkit)
    link_stubs "$cuda"
    step "building the CUDA wheel (candle: CUDA_COMPUTE_CAP=80 PTX; ours: sm_$sass + compute_80)"
    # Same target dir as CI's compile check: candle's kernels are compiled once for both.
    PATH="$cuda/bin:$PATH" CUDA_HOME="$cuda" CUDA_COMPUTE_CAP=80 CUDARC_CUDA_VERSION=13000 \
        PID_CUDA_SASS="$sass" CARGO_TARGET_DIR="$ROOT/target/cuda-check" \
        maturin build --release --locked --features cuda --auditwheel skip --out "$out/wheels"
    check_cuda_needed "$(extension_of "$out"/wheels/pid_native-*.whl)"
fi
# device_check refuses a machine whose glibc is older than the newest symbol the extension uses.
glibc=$(objdump -T "$(extension_of "$out"/wheels/pid_native-*.whl)" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)
echo "the extension needs ${glibc/_/ } or newer"

step "dependency wheels for CPython $python_version"
python3 "$HERE/kit.py" deps --python-version "$python_version" --dest "$out/wheels" | tee "$out/deps.json"

if [[ $sanitizer == 1 ]]; then
    step "compute-sanitizer"
    mkdir -p "$out/sanitizer"
    python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_25_x86_64 \
        --dest "$out/sanitizer" -r "$HERE/sanitizer.txt"
fi

if [[ $no_reference == 0 ]]; then
    step "the upstream reference's pid/ package from $reference"
    tar -czf "$out/reference.tar.gz" -C "$reference" --exclude=__pycache__ --exclude='*.pyc' pid
    reference_commit=$(git -C "$reference" rev-parse HEAD 2>/dev/null || echo unknown)
else
    reference_commit=
fi


step "packing the wheels (xz)"
python3 "$HERE/kit.py" pack --kit "$out"

python3 - "$out" "$reference_commit" "$sass" "$(( $(date +%s) - T0 ))" "$wheel" "${glibc#GLIBC_}" <<'EOF'
import json, subprocess, sys
from pathlib import Path
out, reference_commit, sass, seconds, prebuilt, glibc = sys.argv[1:]
out = Path(out)
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip())
kit = {
    "commit": commit,
    "dirty": dirty,
    "wheel": "prebuilt: " + prebuilt if prebuilt else f"built: CUDA 13.0, candle PTX compute_80, ours sm_{sass} + compute_80",
    "glibc": glibc,
    "reference_commit": reference_commit or None,
    "build_seconds": int(seconds),
    "files": {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()},
}
(out / "kit.json").write_text(json.dumps(kit, indent=2) + "\n")
EOF

step "size"
python3 "$HERE/kit.py" size --kit "$out" --limit-mib "$limit"
step "done in $(( $(date +%s) - T0 ))s: $out"

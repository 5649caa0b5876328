# Source this before building with `--features candle-cuda` on a machine without a CUDA toolkit.
#
# candle's `cuda` feature compiles its kernels with nvcc at build time (candle-kernels) and links
# cudarc to the CUDA libraries (`-lcuda -lnvrtc -lcublas -lcublasLt -lcurand -lcudart`). This
# installs CUDA 13.0 (the GPU hosts' version) from the Python package index into
# $SPARSECTR_CUDA_PREFIX (default ~/.cache/sparsectr-cuda13) and exports what the build reads:
# CUDA_HOME (cudarc's link search), NVCC and CUDA_COMPUTE_CAP (candle-kernels), PATH.
#
# The wheels ship every library but the driver's. For `-lcuda` a link stub is generated, as the
# toolkit's own lib64/stubs/libcuda.so: a shared library with soname libcuda.so.1 whose functions
# (every `cu*` entry point that cudarc's driver bindings declare) return
# CUDA_ERROR_STUB_LIBRARY (34). It only satisfies the linker and records `NEEDED libcuda.so.1`;
# it is never carried, and at run time the loader binds the real driver on the GPU host.
#
# Binaries built this way need, on the GPU host: the driver (libcuda.so.1) and CUDA 13.0's
# libnvrtc.so.13, libcublas.so.13, libcublasLt.so.13, libcurand.so.10 and libcudart.so.13 on the
# loader path (scripts/gpu-run.sh puts the toolkit's lib64 there).
#
# CUDA_COMPUTE_CAP (default 90: H100/H200) picks the architecture of candle's native kernels.
_sparsectr_cuda_setup() {
    local prefix=${SPARSECTR_CUDA_PREFIX:-$HOME/.cache/sparsectr-cuda13}
    local site=$prefix/site cu13=$prefix/site/nvidia/cu13 link=$prefix/link
    if [ ! -x "$cu13/bin/nvcc" ] || [ ! -e "$cu13/lib/libcublas.so.13" ]; then
        # One pip call: `--target` with a second call would replace the nvidia/ folder.
        # nvidia-nvvm is pinned too: left free, pip picks a cicc newer than this ptxas.
        python3 -m pip install --quiet --disable-pip-version-check --target "$site" \
            "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*" \
            "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-nvrtc==13.0.*" \
            "nvidia-curand==10.4.0.*" "nvidia-cublas==13.0.*" >&2 || return 1
    fi
    # A CUDA_HOME for the linker: unversioned names for the wheels' libraries, and the stub.
    mkdir -p "$link/lib/stubs" || return 1
    local lib name
    for lib in libnvrtc.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudart.so.13; do
        [ -e "$cu13/lib/$lib" ] || { echo "candle-cuda-env: $cu13/lib/$lib missing" >&2; return 1; }
        name=${lib%.so.*}.so
        ln -sfn "$cu13/lib/$lib" "$link/lib/$lib"
        ln -sfn "$lib" "$link/lib/$name"
    done
    if [ ! -e "$link/lib/stubs/libcuda.so" ]; then
        local bindings
        bindings=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs 2>/dev/null | tail -1)
        [ -n "$bindings" ] || { echo "candle-cuda-env: cudarc's driver bindings not found; run 'cargo fetch' first" >&2; return 1; }
        # The names of the functions in cudarc's `extern "C"` blocks (the dynamic-linking path).
        grep -A1 '^ *extern "C" {$' "$bindings" | sed -n 's/^ *fn \(cu[A-Za-z0-9_]*\)(.*/\1/p' | sort -u \
            | awk '{ printf "int %s(void) { return 34; /* CUDA_ERROR_STUB_LIBRARY */ }\n", $1 }' \
            > "$link/lib/stubs/libcuda_stub.c"
        [ -s "$link/lib/stubs/libcuda_stub.c" ] || { echo "candle-cuda-env: no driver entry points in $bindings" >&2; return 1; }
        cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$link/lib/stubs/libcuda.so" \
            "$link/lib/stubs/libcuda_stub.c" || return 1
    fi
    # For starting such binaries where there is no driver (they then report no GPU):
    # LD_LIBRARY_PATH=$SPARSECTR_CUDA_STUB_RUN:$cu13/lib. Never on a GPU host's loader path.
    mkdir -p "$link/run-stub" && ln -sfn ../lib/stubs/libcuda.so "$link/run-stub/libcuda.so.1"
    export SPARSECTR_CUDA_STUB_RUN=$link/run-stub SPARSECTR_CUDA_LIB=$cu13/lib
    export CUDA_HOME=$link
    export NVCC=$cu13/bin/nvcc
    export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
    case ":$PATH:" in *":$cu13/bin:"*) ;; *) export PATH="$cu13/bin:$PATH" ;; esac
    # Build scripts that include cuda.h etc. find the headers beside nvcc; nothing else to set.
}
_sparsectr_cuda_setup
unset -f _sparsectr_cuda_setup

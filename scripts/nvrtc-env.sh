# Source this: installs NVRTC 13.0 from the Python package index if no libnvrtc is loadable, and
# puts the wheel's lib/ on LD_LIBRARY_PATH so that cudarc (which loads libnvrtc by name) finds it.
# Machines with a CUDA toolkit already on the loader path are left as they are.
_sparsectr_nvrtc_lib() {
    python3 - <<'PY' 2>/dev/null
import importlib.util, os
spec = importlib.util.find_spec("nvidia")
for root in (spec.submodule_search_locations if spec else []):
    lib = os.path.join(root, "cu13", "lib")
    if os.path.exists(os.path.join(lib, "libnvrtc.so.13")):
        print(lib)
        break
PY
}
if ! ldconfig -p 2>/dev/null | grep -q 'libnvrtc\.so' ; then
    _lib=$(_sparsectr_nvrtc_lib)
    if [ -z "$_lib" ]; then
        python3 -m pip install --quiet --disable-pip-version-check "nvidia-cuda-nvrtc==13.0.*" >&2
        _lib=$(_sparsectr_nvrtc_lib)
    fi
    if [ -n "$_lib" ]; then
        export LD_LIBRARY_PATH="$_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
    unset _lib
fi
unset -f _sparsectr_nvrtc_lib

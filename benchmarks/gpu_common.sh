# Sourced by benchmarks/gpu_check.sh and gpu_session.sh: install dpfused on the GPU machine from the
# wheels carried in .whl/ (it reaches no registry), and describe the machine.

install_dpfused() {
    local site=/tmp/dpfused-site
    if [ -d .whl ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" \
            .whl/*.whl || return 1
    fi
    export PYTHONPATH="$site"
    # Editable, as CI installs it.
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || return 1
}

environment() {
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo "no GPU"
    python3 -c "import sys, torch, triton, opacus, transformers, dpfused; \
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'opacus', opacus.__version__, 'transformers', \
transformers.__version__, 'dpfused', dpfused.__version__, dpfused.__file__)"
}

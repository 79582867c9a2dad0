# The two commands of the README. Each prepares its environment first (scripts/setup-env.sh), so both work on a
# fresh machine: CPU-only machines get a .venv with PyTorch's CPU build; GPU machines use their CUDA PyTorch.
#
#   make bench   the benchmark suite (CPU by default, the GPU set when a GPU is present)
#   make test    the test suite (CPU: Triton kernels in the interpreter + ahead-of-time compile for sm_80/sm_90)
#   make test-oldest-triton   the same kernel checks on the oldest supported Triton, in .venv-triton-oldest: the
#                ahead-of-time compile (marker aot) and every test that runs the kernels (marker triton_kernels,
#                set by tests/conftest.py), in that Triton's interpreter
#   make gpu-check [OUT=dir]   the GPU acceptance run (benchmarks/gpu_check.py): CUDA tests, headline and QLoRA
#                benchmarks, per-kernel timings, goals; at most 8 minutes, everything in one folder (OUT, else
#                $GPU_CHECK_OUT, else benchmarks/results/gpu-check-<device>). Without CUDA it prints its plan.
#                If the set-up fails (e.g. an offline GPU image refusing the editable install), python3 runs it
#                from the checkout as it is.

.PHONY: bench test test-oldest-triton compile-report gpu-check

bench:
	@PY=$$(scripts/setup-env.sh) && $$PY -m benchmarks $(ARGS)

test:
	@PY=$$(scripts/setup-env.sh) && $$PY -m pytest tests -q $(ARGS)

test-oldest-triton:
	@PY=$$(scripts/setup-env.sh --triton-oldest) && \
	$$PY -c 'import numpy, torch, triton; print("oldest Triton:", triton.__version__, "torch", torch.__version__, "numpy", numpy.__version__)' && \
	$$PY -m pytest tests -q -m "aot or triton_kernels" $(ARGS) \
	    -W "ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning"  # 3.6's interpreter on numpy 2.3

compile-report:
	@PY=$$(scripts/setup-env.sh) && $$PY -m benchmarks.compile_report $(ARGS)

gpu-check:
	@PY=$$(scripts/setup-env.sh) || { echo "gpu-check: set-up failed; running python3 on the checkout" >&2; PY=python3; }; \
	$$PY -m benchmarks.gpu_check $(if $(OUT),--out "$(OUT)") $(ARGS)

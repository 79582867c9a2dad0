# The two commands of the README. Each prepares its environment first (scripts/setup-env.sh), so both work on a
# fresh machine: CPU-only machines get a .venv with PyTorch's CPU build; GPU machines use their CUDA PyTorch.
#
#   make bench   the benchmark suite (CPU by default, the GPU set when a GPU is present)
#   make test    the test suite (CPU: Triton kernels in the interpreter + ahead-of-time compile for sm_80/sm_90)

.PHONY: bench test compile-report

bench:
	@PY=$$(scripts/setup-env.sh) && $$PY -m benchmarks $(ARGS)

test:
	@PY=$$(scripts/setup-env.sh) && $$PY -m pytest tests -q $(ARGS)

compile-report:
	@PY=$$(scripts/setup-env.sh) && $$PY -m benchmarks.compile_report $(ARGS)

# Every target sets up what it needs on a fresh machine (scripts/setup.sh is idempotent).
.PHONY: setup demo test bench notebooks
setup:
	bash scripts/setup.sh
demo:
	bash scripts/demo.sh
test:
	bash scripts/test.sh
bench:
	bash scripts/bench.sh
notebooks:
	bash scripts/notebooks.sh

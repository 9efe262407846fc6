# The two commands of the README: `make app` (web UI on the built-in base) and `make test`.
.PHONY: install app demo test bench

install:
	@bash scripts/install.sh

app: install
	.venv/bin/python app.py

demo: install
	bash scripts/demo.sh

# Two worker processes (each torch on one thread, tests/conftest.py), a file's tests kept together so its
# module fixtures (the style test's trainings) run once.
test: install
	.venv/bin/python -m pytest -q -n 2 --dist loadfile

bench: install
	.venv/bin/python bench/train_step.py
	.venv/bin/python bench/generation.py

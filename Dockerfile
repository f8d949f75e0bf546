FROM python:3.11.11-slim-bookworm
WORKDIR /app
COPY requirements.lock pyproject.toml README.md ./
RUN python -m pip install --no-cache-dir --require-hashes -r requirements.lock
COPY mayfly ./mayfly
COPY workflows ./workflows
COPY activities ./activities
COPY simulator ./simulator
COPY worker.py ./
RUN python -m pip install --no-cache-dir --no-deps --no-build-isolation .
USER nobody

# The runtime image: Mayfly and its runtime dependencies only (requirements.lock, hash-checked).
# No simulator, tests or dev tools: those live in requirements-dev.lock and the repository.

FROM python:3.11.11-slim-bookworm AS build
WORKDIR /src
COPY requirements-dev.lock pyproject.toml README.md ./
# Only the build backend, at the version and hashes the dev lock pins.
RUN python - <<'PY'
import re
lock = open("requirements-dev.lock").read()
block = re.search(r"^setuptools==.*?(?=^\S|\Z)", lock, re.MULTILINE | re.DOTALL)
open("/tmp/build.lock", "w").write(block.group(0))
PY
RUN python -m pip install --no-cache-dir --require-hashes -r /tmp/build.lock
COPY mayfly ./mayfly
COPY workflows ./workflows
COPY activities ./activities
COPY worker.py ./
RUN python -m pip wheel --no-cache-dir --no-deps --no-build-isolation -w /wheels .

FROM python:3.11.11-slim-bookworm
WORKDIR /app
COPY requirements.lock ./
RUN python -m pip install --no-cache-dir --require-hashes -r requirements.lock
COPY --from=build /wheels /wheels
RUN python -m pip install --no-cache-dir --no-deps /wheels/*.whl && rm -rf /wheels
# A fixed unprivileged uid (not nobody, whose files would be anyone's) owning the state volume
# mount point, so the local backend can write its records there.
RUN useradd --system --uid 10001 --home-dir /var/lib/mayfly --create-home mayfly \
    && mkdir -p /var/lib/mayfly/local-backend && chown -R mayfly:mayfly /var/lib/mayfly
ENV MAYFLY_STATE_DIR=/var/lib/mayfly
WORKDIR /var/lib/mayfly
USER mayfly
CMD ["mayfly", "--help"]

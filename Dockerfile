# One image for every zapbus service; compose.yaml picks the service with `command`,
# e.g. `python -m services.gateway` or `zapbus migrate`. Configured only by ZAPBUS_* variables.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin zapbus

WORKDIR /src

# Dependencies first, from pyproject.toml alone: this layer is rebuilt only when it changes.
# The base dependencies only: not the `local` extra (the embedded NATS and PostgreSQL of
# `make run` and the tests); the image is given its NATS and PostgreSQL.
COPY pyproject.toml ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Then the packages (those of [tool.setuptools.packages.find] in pyproject.toml).
COPY proto ./proto
COPY services ./services
COPY zapbus ./zapbus
RUN pip install --no-cache-dir . && rm -rf build *.egg-info

# Run the installed package, not the source tree, and never as root.
WORKDIR /home/zapbus
USER 10001

# gateway, webhook, session_worker, projector, baileys_sim
EXPOSE 8080 8081 9102 9103 3100

CMD ["zapbus", "--help"]

# One image for `llm-gateway serve`, `simulate` and `demo`.
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway_app ./gateway_app
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
# LLM_GATEWAY_DEMO_HOST: `docker run -p 8000:8000 <image> demo` must listen on the container's interface,
# not on its loopback, to be reachable through the published port (serve and simulate already default to 0.0.0.0).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    LLM_GATEWAY_DEMO_HOST=0.0.0.0
COPY --from=build /wheels /wheels
# --no-index: only the wheels built above (the name llm-gateway on PyPI belongs to an unrelated project).
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /wheels llm-gateway \
    && rm -rf /wheels \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin gateway
USER 10001
EXPOSE 8000
ENTRYPOINT ["llm-gateway"]
CMD ["serve", "--config", "/etc/llm-gateway/routes.yaml"]

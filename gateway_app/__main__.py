"""`python -m gateway_app` is the same as the `llm-gateway` command."""

from gateway_app.cli import main

raise SystemExit(main())

"""The OpenAI-compatible HTTP server (`exitspec serve`).

    protocol.py   request bodies -> validated `CompletionRequest`s, OpenAI-style `APIError`s
    scheduler.py  one decode worker thread stepping decoding's engines; requests join and leave at each step
    metrics.py    the Prometheus metrics of GET /metrics
    app.py        the FastAPI app: /v1/models, /v1/chat/completions, /v1/completions, /health, SSE
    cli.py        `exitspec serve` arguments; loads the model and runs uvicorn
"""

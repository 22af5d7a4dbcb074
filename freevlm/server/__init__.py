"""`freevlm serve`: the OpenAI Chat Completions API over the continuous-batching scheduler (`freevlm.serving`).

`create_app` (app.py) builds the FastAPI app for one loaded model; `ServerConfig` (config.py) holds every server
option and its default; api.py is the request schema and the OpenAI error object; chat.py turns a chat request into
model inputs and streamed tokens back into text; metrics.py the Prometheus metrics. Importing this package needs
the `serve` extra (FastAPI, uvicorn, prometheus-client, httpx)."""

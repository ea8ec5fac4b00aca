"""An OpenAI-compatible HTTP API in front of a served CoordExp ensemble (`coordexp-server --openai-port`):
`protocol` (typed requests, errors in OpenAI's shape), `messages` (chat messages -> image + prompt
parts), `service` (the engine client: the one Triton client library's ServerPool), `app` (FastAPI
routes), `runner` (uvicorn in a background thread of coordexp-server)."""

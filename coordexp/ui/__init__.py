"""The web viewer (`coordexp-client ui`): FastAPI app (app.py), single-image inference (infer.py),
static pages and scripts (static/, plain HTML + JS, no build step)."""

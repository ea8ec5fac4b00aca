"""CoordExp Serve: deploy CoordExp grounding VLMs with Triton."""
__version__ = "0.1.0"

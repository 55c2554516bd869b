"""mmart: post-train a multimodal LLM to choose the artwork each member is most likely to play."""

__version__ = "0.1.0"

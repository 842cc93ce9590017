"""sstoken: offline ssToken token scoring and selection, as a pipeline of reusable artifacts."""

__version__ = "0.1.0"

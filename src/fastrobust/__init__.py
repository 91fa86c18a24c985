"""fastrobust: efficient adversarial robust training and honest robustness evaluation."""

__version__ = "0.1.0"

from fastrobust.errors import ConfigError, DataError, FastRobustError  # noqa: E402

__all__ = ["ConfigError", "DataError", "FastRobustError", "__version__"]

"""The one error type of the input pipeline: bad data, config or paths (never a bug of ours)."""


class DataError(ValueError):
    """A dataset, data_dir, image or data config the input pipeline cannot use; the message says
    what is wrong and what is allowed."""

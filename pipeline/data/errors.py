"""The data error every reader raises: a user-facing sentence, before anything trains or searches where possible."""


class DataError(ValueError):
    """Shards or manifest are missing, unreachable or disagree."""

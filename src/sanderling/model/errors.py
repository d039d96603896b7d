"""Per-object validation errors: a bad object is reported, never crashes the agent."""


class ModelError(ValueError):
    """An object that cannot be turned into network state; names the object and the field."""

    def __init__(self, obj: str, field: str, problem: str) -> None:
        self.obj = obj
        self.field = field
        self.problem = problem
        super().__init__(f"{obj}: {field}: {problem}")

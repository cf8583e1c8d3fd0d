"""What `explain` cannot answer, in a module of its own: `maglev-bridge` catches it for every command, and only
`explain` needs the Maglev model's numpy."""


class ExplainError(ValueError):
    """The question cannot be answered: names what is missing."""

"""The one error type the job commands (eval, train, embed) turn into a clear message and exit code 2."""

from __future__ import annotations


class UserInputError(ValueError):
    """Bad input from the user (files, flags, variant definitions): shown as one line per problem, no traceback.
    Several problems found together travel together, so that one run reports all of them."""

    def __init__(self, *problems: str):
        super().__init__("\n".join(problems))
        self.problems = list(problems)

    @classmethod
    def combine(cls, errors: list[UserInputError]) -> UserInputError:
        return cls(*[problem for error in errors for problem in error.problems])


class Problems:
    """Collects the UserInputErrors of independent checks, so that one run reports all of them at once."""

    def __init__(self):
        self.errors: list[UserInputError] = []

    def attempt(self, fn, *args, **kwargs):
        """`fn(...)`, or None when it raised a UserInputError (kept for `raise_any`)."""
        try:
            return fn(*args, **kwargs)
        except UserInputError as exc:
            self.errors.append(exc)
            return None

    def add(self, message: str) -> None:
        self.errors.append(UserInputError(message))

    def raise_any(self) -> None:
        if self.errors:
            raise UserInputError.combine(self.errors)

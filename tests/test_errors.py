"""User errors have their own type; it stays a ValueError so existing callers and tests keep working."""

from she.config import ConfigError
from she.errors import UserError


def test_config_errors_are_user_errors_and_value_errors():
    assert issubclass(ConfigError, UserError) and issubclass(UserError, ValueError)

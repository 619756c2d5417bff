"""``python -m agent.config``: print the configuration reference (``docs/config.md``)."""

from agent.config.reference import config_reference_markdown

if __name__ == "__main__":  # importing this module (the import-graph test does) prints nothing
    print(config_reference_markdown(), end="")

"""peftkit's built-in method plugins, installed as ``peftkit_methods``.

Each module registers through the ``peftkit.methods`` entry-point group in pyproject.toml, exactly as a
third-party plugin package would; the core never imports them by name.
"""

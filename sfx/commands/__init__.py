"""Sub-commands of ``sfx``: each module defines ``register(subparsers)``; the CLI finds them by itself."""

"""The wire contracts and shared rules: messages, packed arrays, parameters, settings, key names, datasets, costs."""

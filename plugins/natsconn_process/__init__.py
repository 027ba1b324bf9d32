"""Built-in processing transforms: filter, mapping, headers, split, compress, decompress.

Each transform is its own module with its own options model, built on the
SDK's CEL expressions (``connector.Expression``); docs/plugins/process.md
describes them. Like every built-in plugin package, this one imports only
``connector``'s public names.
"""

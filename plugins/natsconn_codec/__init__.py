"""Built-in codecs: ``decode`` and ``encode`` transforms for JSON, Avro, Protobuf
and MessagePack, with schemas from local files or a schema registry."""

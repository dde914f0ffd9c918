"""Domain models: data types, warehouse documents, change events and features."""

"""The clinical domain: the class catalogue, the triage rule and the condition knowledge."""

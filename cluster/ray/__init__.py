"""Everything that runs on Ray: connecting to it, the actor pool that trains candidates (with
retries, heartbeats and memory checks), the token store reaching each node, data-parallel
pretraining with Ray Train, and refinement trials as actors. Nothing else imports Ray."""

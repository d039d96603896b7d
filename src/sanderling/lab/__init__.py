"""Lab building blocks: nodes as network namespaces with their own OVS and agent."""

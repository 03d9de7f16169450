"""Beyond one host: the gateway for remote clients, PCAP-over-IP."""

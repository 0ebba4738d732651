"""The Message Gateway side: the wire-v1 client and its reconnecting session (`client`), the
bulking policy of TS 23.554 8.2.X step 1 (`batching`), and the gateway's UE file (`ue_file`)."""

-- msgin5g.lua: Wireshark (>= 4.0) dissector for the MSGin5G gateway protocol, wire v1:
-- the link between a Message Gateway and the MSGin5G Server of 3GPP TS 23.554 (registration,
-- de-registration and their bulk forms for Non-MSGin5G UEs), spec ../shared/spec/wire-v1.md,
-- and msgd's v1.1 extension, registry sync (DIGEST / LIST, Release), docs/protocol.md §6.
--
-- Runs on TLS (port 7554, or any port whose TLS session negotiated ALPN "msgin5g-gw/1") and,
-- through Decode As, on plaintext TCP:  tshark -X lua_script:msgin5g.lua -d tcp.port==7554,msgin5g
-- Install and use: docs/wireshark.md. Filter names: msgin5g.* (tshark -G fields | grep msgin5g).
--
-- The tables between the GENERATED markers are written by contrib/wireshark/gen_tables.py from
-- wire/ (numbers, names, IE tables, value shapes); a test fails when they differ. Everything
-- below them is driven by those tables: a new message type or IE needs no code here unless it
-- brings a new value shape or rule.

if set_plugin_info then
    set_plugin_info({
        version = "1.1.0",
        description = "MSGin5G gateway protocol (wire v1 and v1.1 registry sync, "
            .. "3GPP TS 23.554 gateway registration)",
        repository = "msgd contrib/wireshark",
    })
end

-- BEGIN GENERATED TABLES (contrib/wireshark/gen_tables.py from wire/; do not edit by hand)
local PROTOCOL_VERSION = 1
local ALPN_PROTOCOL = "msgin5g-gw/1"
local DEFAULT_PORT = 7554
local HEADER_SIZE = 12
local DEFAULT_MAX_FRAME_SIZE = 65535
local MAX_FRAME_SIZE_LIMIT = 16777215
local SERVER_TID_BIT = 0x80000000
local FLAG_MORE = 0x0001
local COMPREHENSION_REQUIRED = 0x80
local INVALID_ENTRY = 6
local RESULT_FAILURE = 1

-- wire-v1 §7
local FAILURE_CAUSES = {[1] = "UE_NOT_PROVISIONED", [2] = "AUTHENTICATION_FAILED", [3] = "GATEWAY_NOT_AUTHORIZED", [4] = "NOT_REGISTERED", [5] = "REGISTERED_VIA_OTHER_GATEWAY", [6] = "INVALID_ENTRY", [7] = "SERVER_BUSY", [8] = "STORAGE_FAILURE"}
local ERROR_CAUSES = {[0] = "NORMAL", [1] = "UNSUPPORTED_VERSION", [2] = "INVALID_FRAME", [3] = "FRAME_TOO_LARGE", [4] = "UNKNOWN_MESSAGE_TYPE", [5] = "INVALID_MESSAGE", [6] = "UNKNOWN_MANDATORY_IE", [7] = "SESSION_NOT_ESTABLISHED", [8] = "TRANSACTION_ID_IN_USE", [9] = "TOO_MANY_OUTSTANDING", [10] = "COUNT_MISMATCH", [11] = "BULK_NOT_ALLOWED", [12] = "TOO_MANY_ENTRIES", [13] = "SHUTTING_DOWN", [14] = "IDLE_TIMEOUT", [15] = "INTERNAL_ERROR", [16] = "OVERLOADED", [17] = "GATEWAY_NOT_ALLOWED"}

-- wire-v1 §3: IEI -> label, filter name, value shape, value names
local IES = {
    [0x01] = {name = "UE Service ID", field = "ue_id", kind = "text", min = 0, max = 255, no_controls = true},
    [0x02] = {name = "UE credential", field = "credential", kind = "bytes", len = 32},
    [0x03] = {name = "Non-MSGin5G UE profile", field = "profile", kind = "group", max = 2048},
    [0x04] = {name = "Registration result", field = "registration_result", kind = "uint", size = 1, allowed = {0, 1}, names = {[0] = "SUCCESS", [1] = "FAILURE"}},
    [0x05] = {name = "De-registration result", field = "deregistration_result", kind = "uint", size = 1, allowed = {0, 1}, names = {[0] = "SUCCESS", [1] = "FAILURE"}},
    [0x06] = {name = "Failure cause", field = "cause", kind = "uint", size = 1, names = {[1] = "UE_NOT_PROVISIONED", [2] = "AUTHENTICATION_FAILED", [3] = "GATEWAY_NOT_AUTHORIZED", [4] = "NOT_REGISTERED", [5] = "REGISTERED_VIA_OTHER_GATEWAY", [6] = "INVALID_ENTRY", [7] = "SERVER_BUSY", [8] = "STORAGE_FAILURE"}},
    [0x07] = {name = "Bulk registration indicator", field = "bulk_registration_indicator", kind = "uint", size = 1, allowed = {1}},
    [0x08] = {name = "Bulk registration response indicator", field = "bulk_registration_response_indicator", kind = "uint", size = 1, allowed = {1}},
    [0x09] = {name = "Bulk de-registration indicator", field = "bulk_deregistration_indicator", kind = "uint", size = 1, allowed = {1}},
    [0x0A] = {name = "Bulk de-registration response indicator", field = "bulk_deregistration_response_indicator", kind = "uint", size = 1, allowed = {1}},
    [0x0B] = {name = "Number of individual entries", field = "count", kind = "uint", size = 4},
    [0x0C] = {name = "Registration entry", field = "registration_entry", kind = "group", max = 65535},
    [0x0D] = {name = "Registration response entry", field = "registration_response_entry", kind = "group", max = 65535},
    [0x0E] = {name = "De-registration entry", field = "deregistration_entry", kind = "group", max = 65535},
    [0x0F] = {name = "De-registration response entry", field = "deregistration_response_entry", kind = "group", max = 65535},
    [0x10] = {name = "Protocol version", field = "protocol_version", kind = "uint", size = 1},
    [0x11] = {name = "Server nonce", field = "server_nonce", kind = "bytes", len = 32},
    [0x12] = {name = "Maximum frame size", field = "max_frame_size", kind = "uint", size = 4},
    [0x13] = {name = "Maximum bulk entries", field = "max_bulk_entries", kind = "uint", size = 4},
    [0x14] = {name = "Maximum outstanding transactions", field = "max_outstanding", kind = "uint", size = 2},
    [0x15] = {name = "Keepalive interval (s)", field = "keepalive_interval", kind = "uint", size = 4},
    [0x16] = {name = "Node name", field = "node_name", kind = "text", min = 1, max = 255, no_controls = false},
    [0x17] = {name = "Bulk allowed", field = "bulk_allowed", kind = "uint", size = 1, allowed = {0, 1}, names = {[0] = "no", [1] = "yes"}},
    [0x18] = {name = "Retry after (ms)", field = "retry_after", kind = "uint", size = 4},
    [0x19] = {name = "Error cause", field = "error_cause", kind = "uint", size = 1, names = {[0] = "NORMAL", [1] = "UNSUPPORTED_VERSION", [2] = "INVALID_FRAME", [3] = "FRAME_TOO_LARGE", [4] = "UNKNOWN_MESSAGE_TYPE", [5] = "INVALID_MESSAGE", [6] = "UNKNOWN_MANDATORY_IE", [7] = "SESSION_NOT_ESTABLISHED", [8] = "TRANSACTION_ID_IN_USE", [9] = "TOO_MANY_OUTSTANDING", [10] = "COUNT_MISMATCH", [11] = "BULK_NOT_ALLOWED", [12] = "TOO_MANY_ENTRIES", [13] = "SHUTTING_DOWN", [14] = "IDLE_TIMEOUT", [15] = "INTERNAL_ERROR", [16] = "OVERLOADED", [17] = "GATEWAY_NOT_ALLOWED"}},
    [0x1A] = {name = "Diagnostic", field = "diagnostic", kind = "text", min = 0, max = 1024, no_controls = false},
    [0x1B] = {name = "Gateway type", field = "gateway_type", kind = "uint", size = 1, allowed = {1, 2}, names = {[1] = "LEGACY_3GPP", [2] = "NON_3GPP"}},
    [0x1C] = {name = "UE authentication required", field = "ue_authentication_required", kind = "uint", size = 1, allowed = {0, 1}, names = {[0] = "no", [1] = "yes"}},
    [0x1D] = {name = "Sync supported", field = "sync.supported", kind = "uint", size = 1, allowed = {1}, names = {[0] = "no", [1] = "yes"}},
    [0x1E] = {name = "Bucket bits", field = "sync.bucket_bits", kind = "uint", size = 1, allowed = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}},
    [0x1F] = {name = "First bucket", field = "sync.first_bucket", kind = "uint", size = 2},
    [0x20] = {name = "Bucket digests", field = "sync.digest", kind = "records", size = 16, item = "Digest", first = 0x1F, index = 0x21},
    [0x21] = {name = "Bucket list", field = "sync.bucket", kind = "list", size = 2, item = "Bucket", ascending = true},
    [0x22] = {name = "Listed UE", field = "sync.listed_ue", kind = "group", max = 65535},
    [0x23] = {name = "UE hash", field = "sync.ue_hash", kind = "bytes", len = 16},
    [0xA4] = {name = "Release", field = "release", kind = "uint", size = 1, allowed = {1}},
    [0x30] = {name = "UE type", field = "ue_type", kind = "uint", size = 1, allowed = {1, 2}, names = {[1] = "LEGACY_3GPP_UE", [2] = "NON_3GPP_UE"}},
    [0x31] = {name = "Triggering UE identifier", field = "triggering_ue_id", kind = "text", min = 1, max = 64, no_controls = true},
    [0x32] = {name = "Triggering port", field = "triggering_port", kind = "uint", size = 2},
    [0x33] = {name = "Triggering protocol", field = "triggering_protocol", kind = "uint", size = 1, allowed = {1, 2, 3}, names = {[1] = "SMS", [2] = "NIDD", [3] = "IP"}},
    [0x34] = {name = "Communication availability", field = "availability", kind = "uints", size = 4, count = 2, parts = {"period", "window"}},
    [0x35] = {name = "Maximum segment size", field = "max_segment_size", kind = "uint", size = 4},
    [0x36] = {name = "Application data", field = "application_data", kind = "opaque", max = 1024},
}

-- names for the code below (wire/constants.py)
local IEI = {UE_SERVICE_ID = 0x01, UE_CREDENTIAL = 0x02, NON_MSGIN5G_UE_PROFILE = 0x03, REGISTRATION_RESULT = 0x04, DEREGISTRATION_RESULT = 0x05, FAILURE_CAUSE = 0x06, BULK_REGISTRATION_INDICATOR = 0x07, BULK_REGISTRATION_RESPONSE_INDICATOR = 0x08, BULK_DEREGISTRATION_INDICATOR = 0x09, BULK_DEREGISTRATION_RESPONSE_INDICATOR = 0x0A, NUMBER_OF_INDIVIDUAL_ENTRIES = 0x0B, REGISTRATION_ENTRY = 0x0C, REGISTRATION_RESPONSE_ENTRY = 0x0D, DEREGISTRATION_ENTRY = 0x0E, DEREGISTRATION_RESPONSE_ENTRY = 0x0F, PROTOCOL_VERSION = 0x10, SERVER_NONCE = 0x11, MAXIMUM_FRAME_SIZE = 0x12, MAXIMUM_BULK_ENTRIES = 0x13, MAXIMUM_OUTSTANDING_TRANSACTIONS = 0x14, KEEPALIVE_INTERVAL = 0x15, NODE_NAME = 0x16, BULK_ALLOWED = 0x17, RETRY_AFTER = 0x18, ERROR_CAUSE = 0x19, DIAGNOSTIC = 0x1A, GATEWAY_TYPE = 0x1B, UE_AUTHENTICATION_REQUIRED = 0x1C, SYNC_SUPPORTED = 0x1D, BUCKET_BITS = 0x1E, FIRST_BUCKET = 0x1F, BUCKET_DIGESTS = 0x20, BUCKET_LIST = 0x21, LISTED_UE = 0x22, UE_HASH = 0x23, RELEASE = 0xA4, UE_TYPE = 0x30, TRIGGERING_UE_IDENTIFIER = 0x31, TRIGGERING_PORT = 0x32, TRIGGERING_PROTOCOL = 0x33, COMMUNICATION_AVAILABILITY = 0x34, MAXIMUM_SEGMENT_SIZE = 0x35, APPLICATION_DATA = 0x36}
local MT = {HELLO = 0x01, HELLO_ACK = 0x02, KEEPALIVE = 0x03, KEEPALIVE_ACK = 0x04, GOODBYE = 0x05, ERROR = 0x06, UE_REGISTRATION_REQUEST = 0x10, UE_REGISTRATION_RESPONSE = 0x11, UE_DEREGISTRATION_REQUEST = 0x12, UE_DEREGISTRATION_RESPONSE = 0x13, BULK_REGISTRATION_REQUEST = 0x14, BULK_REGISTRATION_RESPONSE = 0x15, BULK_DEREGISTRATION_REQUEST = 0x16, BULK_DEREGISTRATION_RESPONSE = 0x17, DIGEST_REQUEST = 0x18, DIGEST_RESPONSE = 0x19, LIST_REQUEST = 0x1A, LIST_RESPONSE = 0x1B}
local EC = {NORMAL = 0, UNSUPPORTED_VERSION = 1, INVALID_FRAME = 2, FRAME_TOO_LARGE = 3, UNKNOWN_MESSAGE_TYPE = 4, INVALID_MESSAGE = 5, UNKNOWN_MANDATORY_IE = 6, SESSION_NOT_ESTABLISHED = 7, TRANSACTION_ID_IN_USE = 8, TOO_MANY_OUTSTANDING = 9, COUNT_MISMATCH = 10, BULK_NOT_ALLOWED = 11, TOO_MANY_ENTRIES = 12, SHUTTING_DOWN = 13, IDLE_TIMEOUT = 14, INTERNAL_ERROR = 15, OVERLOADED = 16, GATEWAY_NOT_ALLOWED = 17}

-- Grouped IEs: their IE tables (IEI, presence M/O/C), in order
local GROUPS = {
    [0x03] = {{0x30, "O"}, {0x31, "O"}, {0x32, "O"}, {0x33, "O"}, {0x34, "O"}, {0x35, "O"}, {0x36, "O"}},
    [0x0C] = {{0x01, "M"}, {0x02, "C"}, {0x03, "O"}},
    [0x0E] = {{0x01, "M"}, {0x02, "C"}, {0xA4, "O"}},
    [0x0D] = {{0x01, "M"}, {0x04, "M"}, {0x06, "C"}, {0x18, "O"}},
    [0x0F] = {{0x01, "M"}, {0x05, "M"}, {0x06, "C"}, {0x18, "O"}},
    [0x22] = {{0x01, "M"}, {0x23, "M"}},
}

-- wire-v1 §4, §5 and docs/protocol.md §6.2: message type -> name, sender, IE table or bulk
-- layout, whether MORE may be set, whether it is a v1.1 sync message
local MESSAGES = {
    [0x01] = {name = "HELLO", sender = "gateway", ies = {{0x10, "M"}, {0x1B, "M"}, {0x16, "O"}, {0x12, "O"}}},
    [0x02] = {name = "HELLO ACK", sender = "server", ies = {{0x10, "M"}, {0x11, "M"}, {0x12, "M"}, {0x13, "M"}, {0x14, "M"}, {0x15, "M"}, {0x17, "M"}, {0x1C, "M"}, {0x16, "O"}, {0x1D, "O"}}},
    [0x03] = {name = "KEEPALIVE", sender = "both", ies = {}},
    [0x04] = {name = "KEEPALIVE ACK", sender = "both", ies = {}},
    [0x05] = {name = "GOODBYE", sender = "both", ies = {{0x19, "M"}, {0x18, "O"}, {0x1A, "O"}}},
    [0x06] = {name = "ERROR", sender = "both", ies = {{0x19, "M"}, {0x18, "O"}, {0x1A, "O"}}},
    [0x10] = {name = "UE REGISTRATION REQUEST", sender = "gateway", ies = {{0x01, "M"}, {0x02, "C"}, {0x03, "O"}}},
    [0x11] = {name = "UE REGISTRATION RESPONSE", sender = "server", ies = {{0x01, "M"}, {0x04, "M"}, {0x06, "C"}, {0x18, "O"}}},
    [0x12] = {name = "UE DE-REGISTRATION REQUEST", sender = "gateway", ies = {{0x01, "M"}, {0x02, "C"}, {0xA4, "O"}}},
    [0x13] = {name = "UE DE-REGISTRATION RESPONSE", sender = "server", ies = {{0x01, "M"}, {0x05, "M"}, {0x06, "C"}, {0x18, "O"}}},
    [0x14] = {name = "BULK REGISTRATION REQUEST", sender = "gateway", bulk = {indicator = 0x07, entry = 0x0C}, fragmented = true},
    [0x15] = {name = "BULK REGISTRATION RESPONSE", sender = "server", bulk = {indicator = 0x08, entry = 0x0D}, fragmented = true},
    [0x16] = {name = "BULK DE-REGISTRATION REQUEST", sender = "gateway", bulk = {indicator = 0x09, entry = 0x0E}, fragmented = true},
    [0x17] = {name = "BULK DE-REGISTRATION RESPONSE", sender = "server", bulk = {indicator = 0x0A, entry = 0x0F}, fragmented = true},
    [0x18] = {name = "DIGEST REQUEST", sender = "gateway", ies = {{0x1E, "M"}}, sync = true},
    [0x19] = {name = "DIGEST RESPONSE", sender = "server", ies = {{0x1E, "O"}, {0x1F, "M"}, {0x20, "M"}}, fragmented = true, sync = true},
    [0x1A] = {name = "LIST REQUEST", sender = "gateway", ies = {{0x1E, "M"}, {0x21, "M"}}, sync = true},
    [0x1B] = {name = "LIST RESPONSE", sender = "server", bulk = {entry = 0x22}, fragmented = true, sync = true},
}

-- request type -> the response type that answers it
local RESPONSE_TO = {
    [0x01] = 0x02,  -- HELLO -> HELLO_ACK
    [0x03] = 0x04,  -- KEEPALIVE -> KEEPALIVE_ACK
    [0x10] = 0x11,  -- UE_REGISTRATION_REQUEST -> UE_REGISTRATION_RESPONSE
    [0x12] = 0x13,  -- UE_DEREGISTRATION_REQUEST -> UE_DEREGISTRATION_RESPONSE
    [0x14] = 0x15,  -- BULK_REGISTRATION_REQUEST -> BULK_REGISTRATION_RESPONSE
    [0x16] = 0x17,  -- BULK_DEREGISTRATION_REQUEST -> BULK_DEREGISTRATION_RESPONSE
    [0x18] = 0x19,  -- DIGEST_REQUEST -> DIGEST_RESPONSE
    [0x1A] = 0x1B,  -- LIST_REQUEST -> LIST_RESPONSE
}
-- END GENERATED TABLES

local proto = Proto("msgin5g", "MSGin5G gateway protocol (wire v1.1)")

-- --- tables derived from the generated ones -------------------------------------------------

local MESSAGE_NAMES, IE_NAMES, IS_RESPONSE = {}, {}, {}
for t, m in pairs(MESSAGES) do MESSAGE_NAMES[t] = m.name end
for i, ie in pairs(IES) do IE_NAMES[i] = ie.name end
for _, rsp in pairs(RESPONSE_TO) do IS_RESPONSE[rsp] = true end

-- An IE table as {list = {{iei, presence}, ...}, index = {iei -> position}}.
local function make_spec(name, list)
    local spec = {name = name, list = list, index = {}}
    for pos, f in ipairs(list) do spec.index[f[1]] = pos end
    spec.has_result = spec.index[IEI.REGISTRATION_RESULT] ~= nil
        or spec.index[IEI.DEREGISTRATION_RESULT] ~= nil
    return spec
end
local MESSAGE_SPECS, GROUP_SPECS, ENTRY_IEIS = {}, {}, {}
for t, m in pairs(MESSAGES) do
    if m.ies then MESSAGE_SPECS[t] = make_spec(m.name, m.ies) end
    -- The entries of wire-v1 §5 bulks are decoded one by one (a bad one is INVALID_ENTRY);
    -- LIST RESPONSE's Listed UEs (no indicator) are part of their message: a bad one makes
    -- the gateway answer INVALID_MESSAGE (docs/protocol.md §6.2).
    if m.bulk and m.bulk.indicator then ENTRY_IEIS[m.bulk.entry] = true end
end
-- docs/protocol.md §6.1: the largest Bucket bits a request may carry.
local BUCKET_BITS_MAX = 0
for _, b in ipairs(IES[IEI.BUCKET_BITS].allowed) do
    BUCKET_BITS_MAX = math.max(BUCKET_BITS_MAX, b)
end
for i, list in pairs(GROUPS) do GROUP_SPECS[i] = make_spec(IES[i].name, list) end

-- --- fields -----------------------------------------------------------------------------------

local hf = {
    version = ProtoField.uint8("msgin5g.version", "Version", base.DEC),
    type = ProtoField.uint8("msgin5g.type", "Message type", base.HEX, MESSAGE_NAMES),
    flags = ProtoField.uint16("msgin5g.flags", "Flags", base.HEX),
    more = ProtoField.bool("msgin5g.flags.more", "MORE", 16,
        {"more fragments follow", "last fragment"}, FLAG_MORE),
    reserved = ProtoField.uint16("msgin5g.flags.reserved", "Reserved", base.HEX, nil,
        0xFFFF - FLAG_MORE),
    tid = ProtoField.uint32("msgin5g.tid", "Transaction ID", base.DEC),
    length = ProtoField.uint32("msgin5g.length", "Body length", base.DEC),
    sender = ProtoField.string("msgin5g.sender", "Sender"),
    ie = ProtoField.none("msgin5g.ie", "Information element"),
    iei = ProtoField.uint8("msgin5g.ie.iei", "IEI", base.HEX, IE_NAMES),
    ie_cr = ProtoField.bool("msgin5g.ie.comprehension_required", "Comprehension required", 8,
        nil, COMPREHENSION_REQUIRED),
    ie_length = ProtoField.uint16("msgin5g.ie.length", "Length", base.DEC),
    ie_value = ProtoField.bytes("msgin5g.ie.value", "Value"),
    entry = ProtoField.uint32("msgin5g.entry", "Entry number", base.DEC),
    bulk = ProtoField.none("msgin5g.bulk", "Bulk fragment"),
    bulk_fragment = ProtoField.uint32("msgin5g.bulk.fragment", "Fragment number", base.DEC),
    bulk_entries = ProtoField.uint32("msgin5g.bulk.fragment_entries", "Entries in this fragment",
        base.DEC),
    bulk_first = ProtoField.uint32("msgin5g.bulk.first_entry", "First entry number", base.DEC),
    bulk_so_far = ProtoField.uint32("msgin5g.bulk.entries_so_far", "Entries so far", base.DEC),
    bulk_failures = ProtoField.uint32("msgin5g.bulk.fragment_failures",
        "Failed entries in this fragment", base.DEC),
    bulk_count = ProtoField.uint32("msgin5g.bulk.announced", "Announced number of entries",
        base.DEC),
    bulk_last = ProtoField.bool("msgin5g.bulk.last", "Last fragment"),
    request_in = ProtoField.framenum("msgin5g.request_in", "Request in", base.NONE,
        frametype.REQUEST),
    response_in = ProtoField.framenum("msgin5g.response_in", "Response in", base.NONE,
        frametype.RESPONSE),
    time = ProtoField.relative_time("msgin5g.time", "Time since request"),
    -- v1.1: the fragments of a DIGEST RESPONSE (docs/protocol.md §6.2)
    digest = ProtoField.none("msgin5g.sync.digest_fragment", "Digest fragment"),
    digest_fragment = ProtoField.uint32("msgin5g.sync.fragment", "Fragment number", base.DEC),
    digest_buckets = ProtoField.uint32("msgin5g.sync.fragment_buckets",
        "Buckets in this fragment", base.DEC),
    digest_so_far = ProtoField.uint32("msgin5g.sync.buckets_so_far", "Buckets so far", base.DEC),
    digest_total = ProtoField.uint32("msgin5g.sync.bucket_count", "Buckets in all (2^Bucket bits)",
        base.DEC),
    digest_last = ProtoField.bool("msgin5g.sync.last", "Last fragment"),
}
-- One field per IE value, named by the generated table (msgin5g.ue_id, msgin5g.cause, ...).
local hf_value, hf_parts = {}, {}
for iei, ie in pairs(IES) do
    local abbr = "msgin5g." .. ie.field
    if ie.kind == "text" then
        hf_value[iei] = ProtoField.string(abbr, ie.name, base.UNICODE)
    elseif ie.kind == "uint" then
        local make = ({ProtoField.uint8, ProtoField.uint16, nil, ProtoField.uint32})[ie.size]
        hf_value[iei] = make(abbr, ie.name, base.DEC, ie.names)
    elseif ie.kind == "uints" then
        hf_parts[iei] = {}
        for k, part in ipairs(ie.parts) do
            hf_parts[iei][k] = ProtoField.uint32(abbr .. "." .. part, ie.name .. " " .. part,
                base.DEC)
        end
    elseif ie.kind == "bytes" or ie.kind == "opaque" then
        hf_value[iei] = ProtoField.bytes(abbr, ie.name)
    elseif ie.kind == "records" then
        hf_value[iei] = ProtoField.bytes(abbr, ie.item)
    elseif ie.kind == "list" then
        hf_value[iei] = ProtoField.uint16(abbr, ie.item, base.DEC)
    end
end
local all_fields = {}
for _, f in pairs(hf) do all_fields[#all_fields + 1] = f end
for _, f in pairs(hf_value) do all_fields[#all_fields + 1] = f end
for _, parts in pairs(hf_parts) do
    for _, f in ipairs(parts) do all_fields[#all_fields + 1] = f end
end
proto.fields = all_fields

-- --- expert infos: each names the wire-v1 error its fault would earn --------------------------

local E, W, N = expert.severity.ERROR, expert.severity.WARN, expert.severity.NOTE
local G = expert.group
local function ei(name, text, group, severity)
    return ProtoExpert.new("msgin5g.expert." .. name, text, group, severity)
end
local ef = {
    unsupported_version = ei("unsupported_version", "Unsupported protocol version", G.PROTOCOL, E),
    reserved_flags = ei("reserved_flags", "Reserved flag bits set", G.MALFORMED, E),
    frame_too_large = ei("frame_too_large", "Frame body too large", G.PROTOCOL, E),
    unknown_message_type = ei("unknown_message_type", "Unknown message type", G.UNDECODED, W),
    more_on_single = ei("more_on_single", "MORE on a message that is never fragmented",
        G.PROTOCOL, E),
    bad_tid = ei("bad_tid", "Transaction ID not allowed here", G.PROTOCOL, E),
    wrong_direction = ei("wrong_direction", "Message sent in the wrong direction", G.PROTOCOL, E),
    truncated_ie = ei("truncated_ie", "IE runs past the end of its container", G.MALFORMED, E),
    ie_length = ei("ie_length", "IE length does not fit its type", G.MALFORMED, E),
    unknown_mandatory_ie = ei("unknown_mandatory_ie", "Unknown comprehension-required IE",
        G.PROTOCOL, E),
    unknown_optional_ie = ei("unknown_optional_ie", "Unknown optional IE (skipped)", G.UNDECODED,
        N),
    unexpected_ie = ei("unexpected_ie", "IE does not belong here", G.PROTOCOL, E),
    duplicate_ie = ei("duplicate_ie", "IE appears twice", G.PROTOCOL, E),
    ie_order = ei("ie_order", "IE out of order", G.PROTOCOL, E),
    missing_ie = ei("missing_ie", "Mandatory IE missing", G.PROTOCOL, E),
    bad_value = ei("bad_value", "Value not allowed", G.PROTOCOL, E),
    text_length = ei("text_length", "Text length out of range", G.MALFORMED, E),
    not_utf8 = ei("not_utf8", "Text is not UTF-8", G.MALFORMED, E),
    control_char = ei("control_char", "Control character in text", G.PROTOCOL, E),
    empty_ue_id = ei("empty_ue_id", "UE Service ID of 0 octets", G.PROTOCOL, E),
    failure_cause = ei("failure_cause", "Failure cause present iff result is failure",
        G.PROTOCOL, E),
    bulk_header = ei("bulk_header", "Bulk indicator or Number of entries missing or misplaced",
        G.PROTOCOL, E),
    bulk_continuation = ei("bulk_continuation",
        "Fragment (bulk, LIST or DIGEST RESPONSE) whose first fragment is not in the capture",
        G.SEQUENCE, N),
    bulk_restarted = ei("bulk_restarted",
        "New fragmented message while the previous one with this id had no last fragment",
        G.SEQUENCE, W),
    count_mismatch = ei("count_mismatch", "Entries differ from the announced number", G.PROTOCOL,
        E),
    too_many_entries = ei("too_many_entries", "More entries than the server's maximum",
        G.PROTOCOL, E),
    -- v1.1, registry sync (docs/protocol.md §6.2, §6.3)
    not_ascending = ei("not_ascending", "List not strictly ascending", G.PROTOCOL, E),
    bucket_range = ei("bucket_range", "Bucket number not below 2^Bucket bits", G.PROTOCOL, E),
    digest_sequence = ei("digest_sequence",
        "DIGEST RESPONSE fragments with a gap or overlap, or Bucket bits misplaced", G.PROTOCOL,
        E),
    digest_count = ei("digest_count", "DIGEST RESPONSE with more or fewer than 2^b buckets",
        G.PROTOCOL, E),
    bucket_bits_mismatch = ei("bucket_bits_mismatch", "Bucket bits other than the request's",
        G.PROTOCOL, E),
    sync_not_announced = ei("sync_not_announced",
        "Sync message on a session whose HELLO ACK did not announce Sync supported", G.PROTOCOL,
        E),
    failure = ei("failure", "Failure result", G.RESPONSE_CODE, N),
    error = ei("error", "ERROR, or GOODBYE with a cause other than NORMAL", G.RESPONSE_CODE, N),
}
local all_experts = {}
for _, e in pairs(ef) do all_experts[#all_experts + 1] = e end
proto.experts = all_experts

-- --- state ------------------------------------------------------------------------------------
-- Changed once per PDU, the first time it is dissected (the first pass over the capture), and
-- kept per PDU: later passes, and the GUI revisiting packets in any order, read it back, so
-- what a packet shows does not depend on which packet was looked at before it.

local f_tcp_stream = Field.new("tcp.stream")
-- The TLS records of the packet dissected so far: the one whose data this call decodes is the
-- last of them (nothing on plaintext TCP).
local f_tls_app_data = Field.new("tls.app_data")
local conversations, pdus = {}, {}

function proto.init()
    conversations, pdus = {}, {}
end

local function conversation(pinfo)
    local stream = f_tcp_stream()
    local key
    if stream then
        key = "tcp" .. tostring(stream.value)
    else
        local a = tostring(pinfo.src) .. ":" .. pinfo.src_port
        local b = tostring(pinfo.dst) .. ":" .. pinfo.dst_port
        key = a < b and (a .. "-" .. b) or (b .. "-" .. a)
    end
    local conv = conversations[key]
    if conv == nil then
        -- sync: nil until a HELLO ACK is seen, then whether it announced Sync supported.
        conv = {gateway = nil, txns = {}, bulks = {}, digests = {}, max_bulk = nil, sync = nil,
                max_frame = {gateway = DEFAULT_MAX_FRAME_SIZE, server = DEFAULT_MAX_FRAME_SIZE}}
        conversations[key] = conv
    end
    return conv
end

-- --- helpers ----------------------------------------------------------------------------------

local function name_of(names, value)
    local n = names and names[value]
    if n then return string.format("%s (%d)", n, value) end
    return tostring(value)
end

-- UTF-8 as Python decodes it (no overlongs, surrogates or code points past U+10FFFF).
-- Returns valid, has C0/C1 control, and the text with bad octets and controls shown as \xNN.
local function check_text(s)
    local i, n = 1, #s
    local out, bad, ctrl = {}, false, false
    while i <= n do
        local c = s:byte(i)
        local len, cp
        if c < 0x80 then len, cp = 1, c
        elseif c >= 0xC2 and c <= 0xDF then len, cp = 2, c - 0xC0
        elseif c >= 0xE0 and c <= 0xEF then len, cp = 3, c - 0xE0
        elseif c >= 0xF0 and c <= 0xF4 then len, cp = 4, c - 0xF0
        end
        local ok = len ~= nil and i + len - 1 <= n
        if ok then
            for k = 1, len - 1 do
                local cc = s:byte(i + k)
                if cc < 0x80 or cc > 0xBF then ok = false break end
                cp = cp * 64 + (cc - 0x80)
            end
        end
        if ok and ((len == 3 and (cp < 0x800 or (cp >= 0xD800 and cp <= 0xDFFF)))
                or (len == 4 and (cp < 0x10000 or cp > 0x10FFFF))) then
            ok = false
        end
        if not ok then
            bad = true
            out[#out + 1] = string.format("\\x%02x", c)
            i = i + 1
        else
            if cp < 0x20 or (cp >= 0x80 and cp <= 0x9F) then
                ctrl = true
                out[#out + 1] = string.format("\\x%02x", cp)
            else
                out[#out + 1] = s:sub(i, i + len - 1)
            end
            i = i + len
        end
    end
    return not bad, ctrl, table.concat(out)
end

local function short_hex(range)
    local hex = range:bytes():tohex(true)
    if #hex > 16 then hex = hex:sub(1, 16) .. "…" end
    return hex
end

-- --- IEs --------------------------------------------------------------------------------------
-- scope: {container = "HELLO" / "Registration entry" ..., cause = wire-v1 error the defect
-- earns (INVALID_MESSAGE, or INVALID_ENTRY inside a bulk entry), umie = the one for an unknown
-- comprehension-required IE, entry = true inside a bulk entry}

local dissect_ies -- forward

-- A value that did not fit its type is {value = nil}: every use below checks for it.
local function group_summary(values)
    local parts = {}
    local function known(iei)
        local v = values[iei]
        return v and v.value
    end
    local uid = values[IEI.UE_SERVICE_ID]
    if uid then parts[#parts + 1] = uid.text or uid.shown end
    local result = known(IEI.REGISTRATION_RESULT) or known(IEI.DEREGISTRATION_RESULT)
    if result then
        parts[#parts + 1] = IES[IEI.REGISTRATION_RESULT].names[result] or tostring(result)
    end
    local cause = known(IEI.FAILURE_CAUSE)
    if cause then parts[#parts + 1] = FAILURE_CAUSES[cause] or tostring(cause) end
    local retry = known(IEI.RETRY_AFTER)
    if retry then parts[#parts + 1] = "retry after " .. retry .. " ms" end
    if known(IEI.RELEASE) then parts[#parts + 1] = "release" end
    if known(IEI.SYNC_SUPPORTED) == 1 then parts[#parts + 1] = "sync supported" end
    local bits = known(IEI.BUCKET_BITS)
    if bits then parts[#parts + 1] = "b=" .. bits end
    local list = values[IEI.BUCKET_LIST]
    if list and list.shown ~= "" then parts[#parts + 1] = "buckets " .. list.shown end
    return table.concat(parts, " ")
end

-- Records (Bucket digests), each shown with its number: the value of IE `ie.first` decoded
-- before it in the same container plus its position, shown in the field of IE `ie.index`
-- (so msgin5g.sync.bucket == 5 finds bucket 5's digest). Value: the number of records.
local function dissect_records(tvb, voff, vlen, iei, ie, item, scope)
    local seen = scope.values and scope.values[ie.first]
    local first = seen and seen.value
    local n = vlen / ie.size
    for k = 0, n - 1 do
        local r = tvb(voff + k * ie.size, ie.size)
        local sub = item:add(hf_value[iei], r)
        local hex = r:bytes():tohex(true)
        if first then
            local number = first + k
            sub:set_text(string.format("%s %d: %s", IES[ie.index].item, number, hex))
            -- (A number past the field's u16 only comes with a count already flagged.)
            if number <= 0xFFFF then
                sub:add(hf_value[ie.index], number):set_generated()
            end
        else
            sub:set_text(string.format("%s %d of this IE: %s", ie.item, k, hex))
        end
    end
    local shown = string.format("%d %s%s", n, ie.item:lower(), n == 1 and "" or "s")
    if first then
        local label = IES[ie.index].item:lower()
        shown = shown .. (n == 1 and string.format(" (%s %d)", label, first)
            or string.format(" (%ss %d-%d)", label, first, first + n - 1))
    end
    return {value = n, shown = shown}
end

-- A list of u16 (Bucket list), strictly ascending when `ie.ascending`. Value: the numbers and
-- their tree items ({numbers = ..., items = ...}).
local function dissect_list(tvb, voff, vlen, iei, ie, item, scope)
    local numbers, items, prev = {}, {}, nil
    for k = 0, vlen / ie.size - 1 do
        local r = tvb(voff + k * ie.size, ie.size)
        local v = r:uint()
        local sub = item:add(hf_value[iei], r)
        if ie.ascending and prev and v <= prev then
            sub:add_proto_expert_info(ef.not_ascending, string.format(
                "%s in %s: %d after %d, not strictly ascending (%s)", ie.name, scope.container,
                v, prev, scope.cause))
        end
        numbers[#numbers + 1], items[#items + 1], prev = v, sub, v
    end
    local shown = {}
    for k = 1, math.min(#numbers, 8) do shown[k] = tostring(numbers[k]) end
    if #numbers > 8 then shown[#shown + 1] = string.format("… (%d in all)", #numbers) end
    return {value = {numbers = numbers, items = items}, shown = table.concat(shown, ", ")}
end

-- Decodes one IE value under `item`; returns {value = ..., shown = text} or nil when the value
-- does not fit its type.
local function dissect_value(tvb, voff, vlen, iei, ie, item, scope, pinfo)
    local vrange = tvb(voff, vlen)
    local function wrong_length(expected)
        if vlen > 0 then item:add(hf.ie_value, vrange) end
        item:add_proto_expert_info(ef.ie_length, string.format(
            "%s in %s: length %d, expected %s (%s)", ie.name, scope.container, vlen, expected,
            scope.cause))
        return nil
    end
    if ie.kind == "uint" then
        if vlen ~= ie.size then return wrong_length(tostring(ie.size)) end
        local v = vrange:uint()
        item:add(hf_value[iei], vrange)
        if ie.allowed then
            local ok = false
            for _, a in ipairs(ie.allowed) do if a == v then ok = true end end
            if not ok then
                item:add_proto_expert_info(ef.bad_value, string.format(
                    "%s in %s: value %d not allowed (%s)", ie.name, scope.container, v,
                    scope.cause))
            end
        end
        return {value = v, shown = name_of(ie.names, v)}
    elseif ie.kind == "uints" then
        if vlen ~= ie.size * ie.count then return wrong_length(tostring(ie.size * ie.count)) end
        local shown = {}
        for k = 1, ie.count do
            local r = tvb(voff + (k - 1) * ie.size, ie.size)
            item:add(hf_parts[iei][k], r)
            shown[k] = ie.parts[k] .. " " .. r:uint()
        end
        return {value = true, shown = table.concat(shown, ", ")}
    elseif ie.kind == "bytes" then
        if vlen ~= ie.len then return wrong_length(tostring(ie.len)) end
        item:add(hf_value[iei], vrange)
        return {value = true, shown = short_hex(vrange)}
    elseif ie.kind == "opaque" then
        if vlen > ie.max then return wrong_length("at most " .. ie.max) end
        item:add(hf_value[iei], vrange)
        return {value = true, shown = vlen .. " octets"}
    elseif ie.kind == "records" or ie.kind == "list" then
        -- docs/protocol.md §6.2: n >= 1 records of `size` octets (an empty one, or one whose
        -- length is not a multiple, is INVALID_MESSAGE).
        if vlen == 0 or vlen % ie.size ~= 0 then
            return wrong_length(string.format("n x %d octets with n >= 1%s", ie.size,
                vlen == 0 and ": it is empty" or ""))
        end
        local dissect = ie.kind == "records" and dissect_records or dissect_list
        return dissect(tvb, voff, vlen, iei, ie, item, scope)
    elseif ie.kind == "text" then
        local raw = vrange:raw()
        local valid, ctrl, shown = check_text(raw)
        item:add(hf_value[iei], vrange, shown)
        local value = raw
        if vlen < ie.min or vlen > ie.max then
            item:add_proto_expert_info(ef.text_length, string.format(
                "%s in %s: %d octets, allowed %d..%d (%s)", ie.name, scope.container, vlen,
                ie.min, ie.max, scope.cause))
            value = nil
        end
        if not valid then
            item:add_proto_expert_info(ef.not_utf8, string.format(
                "%s in %s: not UTF-8 (%s)", ie.name, scope.container, scope.cause))
            value = nil
        elseif ctrl and ie.no_controls then
            item:add_proto_expert_info(ef.control_char, string.format(
                "%s in %s: C0/C1 control character (%s)", ie.name, scope.container, scope.cause))
            value = nil
        end
        return {value = value, shown = '"' .. shown .. '"', text = shown}
    elseif ie.kind == "group" then
        if vlen > ie.max then wrong_length("at most " .. ie.max) end
        local inner = {container = ie.name, cause = scope.cause, umie = scope.umie,
                       entry = scope.entry}
        if ENTRY_IEIS[iei] then
            local invalid_entry = FAILURE_CAUSES[INVALID_ENTRY]
            inner.cause, inner.umie, inner.entry = invalid_entry, invalid_entry, true
        end
        local values = dissect_ies(tvb, voff, voff + vlen, GROUP_SPECS[iei], item, inner, pinfo)
        return {value = values, shown = group_summary(values)}
    end
    return nil
end

-- One IE at `offset`; returns its IEI (nil when its header or value runs past `stop`), its
-- decoded value (or nil), its tree item and the offset after it.
local function dissect_ie(tvb, offset, stop, tree, scope, pinfo)
    local left = stop - offset
    if left < 3 then
        local item = tree:add(hf.ie_value, tvb(offset, left))
        item:set_text(string.format("Truncated IE header (%d octets)", left))
        item:add_proto_expert_info(ef.truncated_ie, string.format(
            "%s: %d octets left, too few for an IE header (%s)", scope.container, left,
            scope.cause))
        return nil, nil, item, stop
    end
    local iei = tvb(offset, 1):uint()
    local vlen = tvb(offset + 1, 2):uint()
    local ie = IES[iei]
    local label = ie and ie.name or string.format("Unknown IE 0x%02x", iei)
    if 3 + vlen > left then
        local item = tree:add(hf.ie, tvb(offset, left))
        item:set_text(label .. " (truncated)")
        item:add(hf.iei, tvb(offset, 1))
        item:add(hf.ie_length, tvb(offset + 1, 2))
        if left > 3 then item:add(hf.ie_value, tvb(offset + 3, left - 3)) end
        item:add_proto_expert_info(ef.truncated_ie, string.format(
            "%s in %s: length %d runs past the end (%d octets left) (%s)", label,
            scope.container, vlen, left - 3, scope.cause))
        return nil, nil, item, stop
    end
    local item = tree:add(hf.ie, tvb(offset, 3 + vlen))
    item:add(hf.iei, tvb(offset, 1))
    item:add(hf.ie_cr, tvb(offset, 1))
    item:add(hf.ie_length, tvb(offset + 1, 2))
    local value
    if ie then
        value = dissect_value(tvb, offset + 3, vlen, iei, ie, item, scope, pinfo)
        item:set_text(label .. (value and value.shown ~= "" and (": " .. value.shown) or ""))
    else
        if vlen > 0 then item:add(hf.ie_value, tvb(offset + 3, vlen)) end
        item:set_text(string.format("%s, %d octets", label, vlen))
    end
    return iei, value, item, offset + 3 + vlen
end

-- An IE that is not in the table of its container (wire-v1 §3, docs/protocol.md item 1).
local function foreign_ie(iei, item, scope)
    if IES[iei] then
        item:add_proto_expert_info(ef.unexpected_ie, string.format(
            "%s does not belong in %s (%s)", IES[iei].name, scope.container, scope.cause))
    elseif iei >= COMPREHENSION_REQUIRED then
        item:add_proto_expert_info(ef.unknown_mandatory_ie, string.format(
            "Unknown IEI 0x%02x with the comprehension-required bit in %s (%s)", iei,
            scope.container, scope.umie))
    else
        item:add_proto_expert_info(ef.unknown_optional_ie, string.format(
            "Unknown optional IEI 0x%02x in %s, skipped", iei, scope.container))
    end
end

-- The conditions of wire-v1 §3 beyond order and presence: Failure cause iff failure, and the
-- 0-octet UE Service ID (docs/protocol.md item 6).
local function check_conditions(spec, values, tree, scope)
    local uid = values[IEI.UE_SERVICE_ID]
    local cause = values[IEI.FAILURE_CAUSE]
    if spec.has_result then
        local result = values[IEI.REGISTRATION_RESULT] or values[IEI.DEREGISTRATION_RESULT]
        if result and result.value then
            local failed = result.value == RESULT_FAILURE
            if failed ~= (cause ~= nil) then
                tree:add_proto_expert_info(ef.failure_cause, string.format(
                    "%s: Failure cause %s but result %s (%s)", scope.container,
                    cause and "present" or "absent", name_of(IES[IEI.REGISTRATION_RESULT].names,
                    result.value), scope.cause))
            elseif failed then
                tree:add_proto_expert_info(ef.failure, string.format(
                    "%s %s: %s", scope.container, uid and uid.shown or "",
                    cause.value and name_of(FAILURE_CAUSES, cause.value) or "cause unreadable"))
            end
        end
    end
    if uid and uid.value == "" then
        local allowed = spec.has_result and scope.entry and cause ~= nil
            and cause.value == INVALID_ENTRY
        if not allowed then
            tree:add_proto_expert_info(ef.empty_ue_id, string.format(
                "%s: UE Service ID of 0 octets (%s)", scope.container, scope.cause))
        end
    end
    -- docs/protocol.md §6.3: every bucket of a Bucket list below 2^Bucket bits.
    local bits = values[IEI.BUCKET_BITS] and values[IEI.BUCKET_BITS].value
    local list = values[IEI.BUCKET_LIST] and values[IEI.BUCKET_LIST].value
    if bits and list and bits <= BUCKET_BITS_MAX then
        for k, v in ipairs(list.numbers) do
            if v >= 2 ^ bits then
                list.items[k]:add_proto_expert_info(ef.bucket_range, string.format(
                    "%s: bucket %d, Bucket bits %d allows 0..%d (%s)", scope.container, v, bits,
                    2 ^ bits - 1, scope.cause))
            end
        end
    end
end

-- An IE list against `spec` (order, duplicates, presence, conditions); returns IEI -> value.
dissect_ies = function(tvb, offset, stop, spec, tree, scope, pinfo)
    local values, last = {}, 0
    scope.values = values -- what an IE's value may depend on (Bucket digests on First bucket)
    while offset < stop do
        local iei, value, item
        iei, value, item, offset = dissect_ie(tvb, offset, stop, tree, scope, pinfo)
        if iei then
            local pos = spec.index[iei]
            if pos == nil then
                foreign_ie(iei, item, scope)
            elseif pos == last then
                item:add_proto_expert_info(ef.duplicate_ie, string.format(
                    "%s appears twice in %s (%s)", IES[iei].name, scope.container, scope.cause))
            elseif pos < last then
                item:add_proto_expert_info(ef.ie_order, string.format(
                    "%s out of order in %s (%s)", IES[iei].name, scope.container, scope.cause))
                values[iei] = values[iei] or value or {value = nil, shown = ""}
            else
                last = pos
                values[iei] = value or {value = nil, shown = ""}
            end
        end
    end
    for _, f in ipairs(spec.list) do
        if f[2] == "M" and values[f[1]] == nil then
            tree:add_proto_expert_info(ef.missing_ie, string.format(
                "Mandatory IE %s missing in %s (%s)", IES[f[1]].name, scope.container,
                scope.cause))
        end
    end
    check_conditions(spec, values, tree, scope)
    return values
end

-- --- bulk messages (wire-v1 §5 Fragmentation and Count) ---------------------------------------

-- The IEs of one bulk fragment: the indicator and the Number (first fragment only), then
-- entries. Returns the entries in this fragment, the Number (nil when absent) and how many
-- entries carry a failure result.
local function dissect_bulk_body(tvb, msg, tree, scope, pinfo, is_first, first_entry)
    local stop = tvb:len()
    local offset = HEADER_SIZE
    local indicator, entry_iei = msg.bulk.indicator, msg.bulk.entry
    local n, count, failed = 0, nil, 0
    -- 0: expect the indicator, 1: the Number (LIST RESPONSE has no indicator), 2: entries
    local phase = is_first and (indicator and 0 or 1) or 2
    while offset < stop do
        local iei, value, item
        iei, value, item, offset = dissect_ie(tvb, offset, stop, tree, scope, pinfo)
        if iei == nil then
            break
        elseif phase == 0 and iei == indicator then
            phase = 1
        elseif phase < 2 and iei == IEI.NUMBER_OF_INDIVIDUAL_ENTRIES then
            if phase == 0 then
                item:add_proto_expert_info(ef.bulk_header, string.format(
                    "%s: %s missing before the Number of individual entries (INVALID_MESSAGE)",
                    msg.name, IES[indicator].name))
            end
            phase, count = 2, value and value.value
        elseif iei == entry_iei then
            if phase < 2 then
                item:add_proto_expert_info(ef.bulk_header, string.format(
                    "%s: entry before the Number of individual entries (INVALID_MESSAGE)",
                    msg.name))
                phase = 2
            end
            n = n + 1
            local values = value and value.value
            local result = type(values) == "table"
                and (values[IEI.REGISTRATION_RESULT] or values[IEI.DEREGISTRATION_RESULT])
            if result and result.value == RESULT_FAILURE then failed = failed + 1 end
            item:prepend_text(string.format("Entry %d, ", first_entry + n - 1))
            item:add(hf.entry, first_entry + n - 1):set_generated()
        elseif iei == indicator or iei == IEI.NUMBER_OF_INDIVIDUAL_ENTRIES then
            item:add_proto_expert_info(ef.bulk_header, string.format(
                "%s: %s out of place (INVALID_MESSAGE)", msg.name, IES[iei].name))
        else
            foreign_ie(iei, item, scope)
        end
    end
    if phase < 2 then
        tree:add_proto_expert_info(ef.bulk_header, string.format(
            "%s: first fragment without the Number of individual entries (INVALID_MESSAGE)",
            msg.name))
    end
    return n, count, failed
end

-- --- DIGEST RESPONSE (docs/protocol.md §6.2 Fragmentation) -----------------------------------

-- First pass over a DIGEST RESPONSE fragment: where it falls among the 2^b buckets of its
-- response, kept as pdu.digest. A fragment opening with Bucket bits starts a response; one
-- without it continues the open one with its id, or, when none is open, is the continuation
-- of a response whose start the capture lacks (or a first fragment that lost its Bucket bits,
-- when it starts at bucket 0).
local function digest_state(conv, pdu, tid, more, values)
    local function known(iei) return values[iei] and values[iei].value end
    local bits, first, n = known(IEI.BUCKET_BITS), known(IEI.FIRST_BUCKET),
        known(IEI.BUCKET_DIGESTS)
    if bits and bits > BUCKET_BITS_MAX then bits = nil end -- flagged as a value already
    local open = conv.digests[tid]
    local d = {}
    if values[IEI.BUCKET_BITS] and (open == nil or first == 0) then
        d.restarted = open ~= nil
        open = {fragments = 0, buckets = 0, bits = bits}
        conv.digests[tid] = open
        d.asked = pdu.txn and pdu.role == "response" and pdu.txn.bucket_bits or nil
        d.bits = bits
    elseif open == nil then
        d.continuation = first ~= 0
        d.bits_missing = first == 0
        open = {fragments = 0, buckets = first or 0, bits = nil}
        conv.digests[tid] = open
    else
        d.late_bits = values[IEI.BUCKET_BITS] ~= nil
    end
    d.fragment, d.expected, d.first, d.n = open.fragments + 1, open.buckets, first, n or 0
    d.total_bits = open.bits
    d.total = open.bits and 2 ^ open.bits or nil
    open.fragments = d.fragment
    -- The next fragment is expected after this one's buckets, so that a single gap is
    -- flagged once, not on every fragment after it.
    open.buckets = (first or open.buckets) + d.n
    d.so_far = open.buckets
    if not more then conv.digests[tid] = nil end
    pdu.digest = d
end

-- The fragment's place in its response and what is wrong with it; returns the Info text.
local function show_digest_fragment(tvb, ti, d, more)
    local bt = ti:add(hf.digest, tvb())
    bt:set_generated()
    local range = d.n > 0 and d.first and string.format("buckets %d-%d", d.first,
        d.first + d.n - 1) or string.format("%d buckets", d.n)
    local of = d.total and string.format(" of %d", d.total) or ""
    bt:set_text(string.format("Digest fragment %d%s: %s%s", d.fragment,
        more and " (MORE)" or " (last)", range, of))
    bt:add(hf.digest_fragment, d.fragment):set_generated()
    bt:add(hf.digest_buckets, d.n):set_generated()
    bt:add(hf.digest_so_far, d.so_far):set_generated()
    if d.total then bt:add(hf.digest_total, d.total):set_generated() end
    bt:add(hf.digest_last, not more):set_generated()
    local function fault(ef_, text, ...)
        bt:add_proto_expert_info(ef_, string.format(text, ...))
    end
    if d.asked and d.bits and d.asked ~= d.bits then
        fault(ef.bucket_bits_mismatch,
            "DIGEST RESPONSE: Bucket bits %d, its DIGEST REQUEST asked for %d (INVALID_MESSAGE)",
            d.bits, d.asked)
    end
    if d.bits_missing then
        fault(ef.digest_sequence,
            "DIGEST RESPONSE: first fragment (bucket 0) without Bucket bits (INVALID_MESSAGE)")
    elseif d.late_bits then
        fault(ef.digest_sequence,
            "DIGEST RESPONSE: Bucket bits in fragment %d, allowed in the first only "
            .. "(INVALID_MESSAGE)", d.fragment)
    end
    if d.first and not d.continuation and not d.bits_missing and d.first ~= d.expected then
        fault(ef.digest_sequence, "DIGEST RESPONSE: fragment %d starts at bucket %d, "
            .. "expected %d: %s (INVALID_MESSAGE)", d.fragment, d.first, d.expected,
            d.first > d.expected and "a gap" or "an overlap")
    end
    if d.total and d.so_far > d.total then
        fault(ef.digest_count, "DIGEST RESPONSE: %d buckets so far, Bucket bits %d makes %d "
            .. "(INVALID_MESSAGE)", d.so_far, d.total_bits, d.total)
    elseif d.total and not more and d.so_far < d.total then
        fault(ef.digest_count, "DIGEST RESPONSE: last fragment after %d of %d buckets "
            .. "(INVALID_MESSAGE)", d.so_far, d.total)
    elseif d.total and more and d.so_far == d.total then
        fault(ef.digest_count, "DIGEST RESPONSE: MORE after the last of %d buckets "
            .. "(INVALID_MESSAGE)", d.total)
    end
    if d.continuation then
        bt:add_proto_expert_info(ef.bulk_continuation)
    elseif d.restarted then
        bt:add_proto_expert_info(ef.bulk_restarted)
    end
    return string.format("fragment %d%s: %s%s", d.fragment, more and " MORE" or "", range, of)
end

-- --- one frame --------------------------------------------------------------------------------

-- First time a PDU is seen: which side sent it (learnt from the first message whose direction
-- is fixed), and whether that contradicts the message's direction.
local function learn_sender(conv, pinfo, msg, pdu)
    local src = tostring(pinfo.src) .. ":" .. tostring(pinfo.src_port)
    local dst = tostring(pinfo.dst) .. ":" .. tostring(pinfo.dst_port)
    if msg and msg.sender ~= "both" then
        local gateway = msg.sender == "gateway" and src or dst
        if conv.gateway == nil then
            conv.gateway = gateway
        elseif conv.gateway ~= gateway then
            pdu.wrong_direction = true
        end
    end
    if conv.gateway == src then
        pdu.sender = "gateway"
    elseif conv.gateway == dst then
        pdu.sender = "server"
    end
end

local function set_info(pinfo, text)
    -- The Info column lists every PDU of the packet. pinfo.private lives for one dissection
    -- of the packet, so it holds what the PDUs before this one wrote; the column is written
    -- whole each time because, between two TLS records of one packet, TLS rewrites the
    -- protocol column and fences the Info column (appending there lost the earlier PDUs).
    local before = pinfo.private.msgin5g_info
    local all = before and (before .. " | " .. text) or text
    pinfo.private.msgin5g_info = all
    pinfo.cols.protocol = "MSGin5G"
    pinfo.cols.info:clear_fence()
    pinfo.cols.info:set(all)
end

local function dissect_pdu(tvb, pinfo, root, conv, key)
    local total = tvb:len()
    local version, mtype = tvb(0, 1):uint(), tvb(1, 1):uint()
    local flags, tid, body_len = tvb(2, 2):uint(), tvb(4, 4):uint(), tvb(8, 4):uint()
    local more = math.floor(flags / FLAG_MORE) % 2 == 1
    local msg = MESSAGES[mtype]
    local name = msg and msg.name or string.format("Unknown message type 0x%02x", mtype)
    -- State changes happen once per PDU (the first time it is seen); later passes read them.
    local pdu, fresh = pdus[key], false
    if pdu == nil then
        pdu, fresh = {}, true
        pdus[key] = pdu
        learn_sender(conv, pinfo, msg, pdu)
        pdu.sync_unannounced = msg ~= nil and msg.sync and conv.sync == false
        local receiver = pdu.sender == "gateway" and "server" or "gateway"
        if pdu.sender and body_len > conv.max_frame[receiver] then
            pdu.too_large = conv.max_frame[receiver]
        end
    end

    local ti = root:add(proto, tvb())
    local item = ti:add(hf.version, tvb(0, 1))
    if version ~= PROTOCOL_VERSION then
        item:add_proto_expert_info(ef.unsupported_version, string.format(
            "Version %d, this is version %d (UNSUPPORTED_VERSION)", version, PROTOCOL_VERSION))
    end
    item = ti:add(hf.type, tvb(1, 1))
    if msg == nil then
        item:add_proto_expert_info(ef.unknown_message_type, string.format(
            "Message type 0x%02x is not defined (UNKNOWN_MESSAGE_TYPE)", mtype))
    elseif pdu.sync_unannounced then
        -- docs/protocol.md §6: without the announcement a server answers UNKNOWN_MESSAGE_TYPE.
        item:add_proto_expert_info(ef.sync_not_announced, string.format(
            "%s, but this session's HELLO ACK did not announce Sync supported "
            .. "(UNKNOWN_MESSAGE_TYPE)", name))
    end
    item = ti:add(hf.flags, tvb(2, 2))
    item:add(hf.more, tvb(2, 2))
    item:add(hf.reserved, tvb(2, 2))
    if flags ~= (more and FLAG_MORE or 0) then
        item:add_proto_expert_info(ef.reserved_flags, string.format(
            "Reserved flag bits 0x%04x set (INVALID_FRAME)", flags - (more and FLAG_MORE or 0)))
    end
    if more and msg and not msg.fragmented then
        item:add_proto_expert_info(ef.more_on_single, string.format(
            "MORE set on %s, which is never fragmented (INVALID_FRAME)", name))
    end
    item = ti:add(hf.tid, tvb(4, 4))
    if mtype ~= MT.ERROR and mtype ~= MT.GOODBYE then
        if tid == 0 then
            item:add_proto_expert_info(ef.bad_tid,
                "Transaction ID 0 is used only by ERROR and GOODBYE (INVALID_MESSAGE)")
        elseif msg and msg.sender ~= "both" and tid >= SERVER_TID_BIT then
            item:add_proto_expert_info(ef.bad_tid, string.format(
                "%s carries a gateway transaction ID, whose top bit is clear (INVALID_MESSAGE)",
                name))
        end
    end
    item = ti:add(hf.length, tvb(8, 4))
    if pdu.too_large then
        item:add_proto_expert_info(ef.frame_too_large, string.format(
            "Body of %d octets, the receiver announced at most %d (FRAME_TOO_LARGE)", body_len,
            pdu.too_large))
    end
    if pdu.sender then
        item = ti:add(hf.sender, pdu.sender == "gateway" and "gateway" or "server")
        item:set_generated()
        if pdu.wrong_direction then
            item:add_proto_expert_info(ef.wrong_direction, string.format(
                "%s sent by the %s (INVALID_MESSAGE)", name, pdu.sender))
        end
    end

    -- A bulk fragment that starts with the indicator or the Number opens its message.
    local first_iei = body_len >= 3 and tvb(HEADER_SIZE, 1):uint() or nil
    local bulk_first = msg ~= nil and msg.bulk ~= nil and (first_iei == msg.bulk.indicator
        or first_iei == IEI.NUMBER_OF_INDIVIDUAL_ENTRIES)
    if fresh then
        -- Request/response linking by transaction id (ended after the body, below).
        local rec = conv.txns[tid]
        if RESPONSE_TO[mtype] then
            if not msg.bulk or bulk_first or rec == nil or rec.type ~= mtype then
                rec = {req = pinfo.number, ts = pinfo.abs_ts, type = mtype}
                conv.txns[tid] = rec
            end
            pdu.txn, pdu.role = rec, "request"
        elseif (IS_RESPONSE[mtype] or mtype == MT.ERROR) and tid ~= 0 and rec
                and (mtype == MT.ERROR or RESPONSE_TO[rec.type] == mtype) then
            rec.rsp = rec.rsp or pinfo.number
            pdu.txn, pdu.role = rec, "response"
        end
    end
    local txn = pdu.txn
    if txn and pdu.role == "request" and txn.rsp then
        ti:add(hf.response_in, txn.rsp):set_generated()
    elseif txn and pdu.role == "response" then
        ti:add(hf.request_in, txn.req):set_generated()
        local d = math.max(0, pinfo.abs_ts - txn.ts)
        local secs = math.floor(d)
        local nsecs = math.min(999999999, math.floor((d - secs) * 1e9 + 0.5))
        ti:add(hf.time, NSTime.new(secs, nsecs)):set_generated()
    end

    local scope = {container = name, cause = "INVALID_MESSAGE", umie = "UNKNOWN_MANDATORY_IE"}
    local info = string.format("%s tid=%d", name, tid)
    local values = {}
    if version ~= PROTOCOL_VERSION then
        if body_len > 0 then
            ti:add(hf.ie_value, tvb(HEADER_SIZE, body_len)):set_text(
                "Body, not decoded (unknown version)")
        end
    elseif msg == nil then
        local offset = HEADER_SIZE
        while offset < total do
            local _, _, _, after = dissect_ie(tvb, offset, total, ti, scope, pinfo)
            offset = after
        end
    elseif msg.bulk then
        if fresh then
            local bulks = conv.bulks[tid]
            if bulks == nil then
                bulks = {}
                conv.bulks[tid] = bulks
            end
            local is_first = bulk_first
            local open = bulks[mtype]
            if is_first or open == nil then
                pdu.restarted = is_first and open ~= nil
                pdu.continuation = not is_first
                open = {fragments = 0, entries = 0, count = nil}
                bulks[mtype] = open
            end
            pdu.bulk = {state = open, is_first = is_first, fragment = open.fragments + 1,
                        before = open.entries, max_bulk = conv.max_bulk}
        end
        local b = pdu.bulk
        local n, count, failed = dissect_bulk_body(tvb, msg, ti, scope, pinfo, b.is_first,
            b.before + 1)
        local responses = GROUP_SPECS[msg.bulk.entry].has_result
        if fresh then
            local st = b.state
            st.fragments, st.entries = st.fragments + 1, st.entries + n
            if count then st.count = count end
            b.n, b.count, b.state = n, st.count, nil
            if not more then conv.bulks[tid][mtype] = nil end
        end
        local bt = ti:add(hf.bulk, tvb())
        bt:set_generated()
        local range = b.n > 0 and string.format("entries %d-%d", b.before + 1, b.before + b.n)
            or "no entries"
        local of = b.count and string.format(" of %d", b.count) or ""
        bt:set_text(string.format("Bulk fragment %d%s: %d entries in this fragment, %s%s",
            b.fragment, more and " (MORE)" or " (last)", b.n, range, of))
        bt:add(hf.bulk_fragment, b.fragment):set_generated()
        bt:add(hf.bulk_entries, b.n):set_generated()
        if b.n > 0 then bt:add(hf.bulk_first, b.before + 1):set_generated() end
        bt:add(hf.bulk_so_far, b.before + b.n):set_generated()
        if responses then bt:add(hf.bulk_failures, failed):set_generated() end
        if b.count then bt:add(hf.bulk_count, b.count):set_generated() end
        bt:add(hf.bulk_last, not more):set_generated()
        if b.count and b.before + b.n > b.count then
            bt:add_proto_expert_info(ef.count_mismatch, string.format(
                "%d entries so far, %d announced (COUNT_MISMATCH)", b.before + b.n, b.count))
        elseif b.count and not more and b.before + b.n < b.count then
            bt:add_proto_expert_info(ef.count_mismatch, string.format(
                "Last fragment after %d of %d announced entries (COUNT_MISMATCH)",
                b.before + b.n, b.count))
        end
        if b.count and b.max_bulk and msg.sender == "gateway" and b.count > b.max_bulk then
            bt:add_proto_expert_info(ef.too_many_entries, string.format(
                "%d entries announced, the server accepts at most %d (TOO_MANY_ENTRIES)",
                b.count, b.max_bulk))
        end
        if pdu.continuation then
            bt:add_proto_expert_info(ef.bulk_continuation)
        elseif pdu.restarted then
            bt:add_proto_expert_info(ef.bulk_restarted)
        end
        info = string.format("%s fragment %d%s: %s%s%s", info, b.fragment,
            more and " MORE" or "", range, of, responses and (", " .. failed .. " failed") or "")
    else
        values = dissect_ies(tvb, HEADER_SIZE, total, MESSAGE_SPECS[mtype], ti, scope, pinfo)
        local summary = group_summary(values)
        if summary ~= "" then info = info .. " " .. summary end
        if msg.fragmented then
            -- DIGEST RESPONSE (docs/protocol.md §6.2): fragmented, but not a bulk.
            if fresh then digest_state(conv, pdu, tid, more, values) end
            info = info .. " " .. show_digest_fragment(tvb, ti, pdu.digest, more)
        end
    end

    local cause = values[IEI.ERROR_CAUSE] and values[IEI.ERROR_CAUSE].value
    if cause then
        info = info .. " " .. (ERROR_CAUSES[cause] or tostring(cause))
        if mtype == MT.ERROR or cause ~= EC.NORMAL then
            ti:add_proto_expert_info(ef.error, string.format("%s tid=%d: %s", name, tid,
                name_of(ERROR_CAUSES, cause)))
        end
    end
    if mtype == MT.HELLO and values[IEI.NODE_NAME] then
        info = info .. " " .. (values[IEI.NODE_NAME].text or "")
    end

    if fresh then
        if mtype == MT.DIGEST_REQUEST and pdu.txn and pdu.role == "request" then
            -- What its response's Bucket bits must be (docs/protocol.md §6.2).
            local bits = values[IEI.BUCKET_BITS]
            pdu.txn.bucket_bits = bits and bits.value
        end
        -- Settings announced in HELLO / HELLO ACK (wire-v1 §2, §5, docs/protocol.md §6).
        local mfs = values[IEI.MAXIMUM_FRAME_SIZE] and values[IEI.MAXIMUM_FRAME_SIZE].value
        if mtype == MT.HELLO and mfs then conv.max_frame.gateway = mfs end
        if mtype == MT.HELLO_ACK then
            if mfs then conv.max_frame.server = mfs end
            local mbe = values[IEI.MAXIMUM_BULK_ENTRIES]
            conv.max_bulk = mbe and mbe.value or conv.max_bulk
            local sync = values[IEI.SYNC_SUPPORTED]
            conv.sync = sync ~= nil and sync.value == 1
        end
        -- An answer ends its transaction (a bulk one with its last fragment); an ERROR does
        -- too, except TRANSACTION_ID_IN_USE (wire-v1 §7.2).
        if (IS_RESPONSE[mtype] or mtype == MT.ERROR) and tid ~= 0 then
            local ends = (mtype == MT.ERROR and cause ~= EC.TRANSACTION_ID_IN_USE)
                or (mtype ~= MT.ERROR and (not msg.fragmented or not more))
            if ends then
                conv.txns[tid] = nil
                if mtype == MT.ERROR then conv.bulks[tid], conv.digests[tid] = nil, nil end
            end
        end
    end

    ti:append_text(", " .. info)
    set_info(pinfo, info)
end

-- --- the stream: frames across TCP segments and TLS records -----------------------------------

function proto.dissector(tvb, pinfo, root)
    local len = tvb:len()
    local offset, index = 0, 0
    local conv = conversation(pinfo)
    -- One TCP segment may carry several TLS records, each decrypted into a tvb of its own that
    -- starts at 0: frames of the same length and header in two of them (full fragments of one
    -- DIGEST RESPONSE) would share their state without the record's position in the key.
    local record = select("#", f_tls_app_data())
    while offset < len do
        local left = len - offset
        if left < HEADER_SIZE then
            pinfo.desegment_offset = offset
            pinfo.desegment_len = DESEGMENT_ONE_MORE_SEGMENT
            return len
        end
        local body_len = tvb(offset + 8, 4):uint()
        if body_len > MAX_FRAME_SIZE_LIMIT then
            -- No receiver may accept this (wire-v1 §2) and nothing says where the next frame
            -- starts: show the header and leave the rest of the segment undecoded.
            local ti = root:add(proto, tvb(offset, left))
            ti:add(hf.version, tvb(offset, 1))
            ti:add(hf.type, tvb(offset + 1, 1))
            ti:add(hf.tid, tvb(offset + 4, 4))
            ti:add(hf.length, tvb(offset + 8, 4)):add_proto_expert_info(ef.frame_too_large,
                string.format("Body length %d exceeds %d (FRAME_TOO_LARGE); rest not decoded",
                    body_len, MAX_FRAME_SIZE_LIMIT))
            set_info(pinfo, "Frame too large")
            return len
        end
        local size = HEADER_SIZE + body_len
        if left < size then
            pinfo.desegment_offset = offset
            pinfo.desegment_len = size - left
            return len
        end
        local key = string.format("%d:%d:%d:%d:%d:%s", pinfo.number, record, len, offset, index,
            tvb(offset, 8):bytes():tohex())
        dissect_pdu(tvb(offset, size):tvb(), pinfo, root, conv, key)
        offset = offset + size
        index = index + 1
    end
    return offset
end

-- --- registration -----------------------------------------------------------------------------

local tcp_port = DissectorTable.get("tcp.port")
tcp_port:add_for_decode_as(proto) -- plaintext: -d tcp.port==7554,msgin5g (Decode As)
local tls = Dissector.get("tls")
if tls then tcp_port:add(DEFAULT_PORT, tls) end -- TLS on the default port
DissectorTable.get("tls.port"):add(DEFAULT_PORT, proto) -- decrypted data on the default port
DissectorTable.get("tls.alpn"):add(ALPN_PROTOCOL, proto) -- any port, by ALPN

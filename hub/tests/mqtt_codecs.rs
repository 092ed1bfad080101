//! The MQTT codecs against what the official SDKs put on the wire
//! (`/work/shared/reference/sdk-wire-capture.md`) and edgeHub's own parser tests
//! (`MqttUsernameParserTest`, Azure/iotedge).

use hub::mqtt::username::{self, UsernameError};

const PY_USERNAME: &str = "acceptance-hub.local/edgedev/modA/?api-version=2019-10-01&DeviceClientType=azure-iot-device-iothub-py%2F2.14.0%283.11.7%3BLinux%20%231%20SMP%20PREEMPT_DYNAMIC%20%400%3Bx86_64%29";
const NODE_USERNAME: &str = "acceptance-hub.local/edgedev/modA/?api-version=2021-04-12&DeviceClientType=azure-iot-device%2F1.18.4%20(node%20v20.20.2%3B%20Debian%2012%3B%20x64)";

#[test]
fn python_sdk_username_parses() {
    let c = username::parse(PY_USERNAME).unwrap();
    assert_eq!(c.iothub_host, "acceptance-hub.local");
    assert_eq!(c.device.as_str(), "edgedev");
    assert_eq!(c.module.as_ref().map(|m| m.as_str()), Some("modA"));
    assert_eq!(c.api_version, "2019-10-01");
    assert_eq!(
        c.client_type.as_deref(),
        Some("azure-iot-device-iothub-py/2.14.0(3.11.7;Linux #1 SMP PREEMPT_DYNAMIC @0;x86_64)")
    );
    assert_eq!(c.model_id, None);
    assert_eq!(c.client_id(), "edgedev/modA");
}

#[test]
fn node_sdk_username_parses_with_its_unencoded_parentheses() {
    let c = username::parse(NODE_USERNAME).unwrap();
    assert_eq!(c.api_version, "2021-04-12");
    assert_eq!(
        c.client_type.as_deref(),
        Some("azure-iot-device/1.18.4 (node v20.20.2; Debian 12; x64)")
    );
    assert_eq!(c.client_id(), "edgedev/modA");
}

#[test]
fn python_pnp_username_carries_the_model_id() {
    let u = "hub.local/dev/?api-version=2020-09-30&DeviceClientType=py&model-id=dtmi%3Acom%3Aexample%3AThermostat%3B1";
    let c = username::parse(u).unwrap();
    assert_eq!(c.module, None);
    assert_eq!(c.client_id(), "dev");
    assert_eq!(c.model_id.as_deref(), Some("dtmi:com:example:Thermostat;1"));
}

#[test]
fn nested_edge_auth_chain_is_reported() {
    let u = "hub/child/$edgeHub/?api-version=2020-10-10&auth-chain=child%3Bparent";
    let c = username::parse(u).unwrap();
    assert_eq!(c.auth_chain.as_deref(), Some("child;parent"));
}

/// `MqttUsernameParserTest.GetUsernames`: (username, device, module, client type, model id).
#[test]
fn edgehub_accepted_usernames() {
    let cases: &[(&str, &str, &str, &str, &str)] = &[
        ("iotHub1/device1/api-version=2010-01-01&DeviceClientType=customDeviceClient1", "device1", "", "customDeviceClient1", ""),
        ("iotHub1/device1/module1/api-version=2010-01-01&DeviceClientType=customDeviceClient2", "device1", "module1", "customDeviceClient2", ""),
        ("iotHub1/device1/module1/api-version=2017-06-30/DeviceClientType=Microsoft.Azure.Devices.Client/1.5.1-preview-003", "device1", "module1", "Microsoft.Azure.Devices.Client/1.5.1-preview-003", ""),
        ("iotHub1/device1/?api-version=2010-01-01&DeviceClientType=customDeviceClient1", "device1", "", "customDeviceClient1", ""),
        ("iotHub1/device1/?api-version=2010-01-01&DeviceClientType=customDeviceClient1&model-id=testModelId", "device1", "", "customDeviceClient1", "testModelId"),
        ("iotHub1/device1/module1/?api-version=2010-01-01&DeviceClientType=customDeviceClient1", "device1", "module1", "customDeviceClient1", ""),
        ("iotHub1/device1/module1/?api-version=2010-01-01&DeviceClientType=customDeviceClient1&model-id=testModelId", "device1", "module1", "customDeviceClient1", "testModelId"),
        ("iotHub1/device1/api-version=2010-01-01&DeviceClientType1=customDeviceClient1", "device1", "", "", ""),
        ("iotHub1/device1/api-version=2010-01-01&DeviceClientType1=customDeviceClient1&model-id=testModelId", "device1", "", "", "testModelId"),
        ("iotHub1/device1/module1/api-version=2010-01-01&", "device1", "module1", "", ""),
        ("iotHub1/device1/module1/api-version=2010-01-01&model-id=testModelId", "device1", "module1", "", "testModelId"),
        ("iotHub1/device1/?api-version=2010-01-01", "device1", "", "", ""),
        ("iotHub1/device1/?api-version=2010-01-01&model-id=testModelId", "device1", "", "", "testModelId"),
        ("iotHub1/device1/module1/?api-version=2010-01-01&Foo=customDeviceClient1", "device1", "module1", "", ""),
        ("iotHub1/device1/module1/foo?bar=b1&api-version=2010-01-01&DeviceClientType=customDeviceClient1", "device1", "module1", "customDeviceClient1", ""),
    ];
    for &(u, device, module, client_type, model_id) in cases {
        let c = username::parse(u).unwrap_or_else(|e| panic!("{u}: {e}"));
        assert_eq!(c.device.as_str(), device, "{u}");
        assert_eq!(c.module.as_ref().map_or("", |m| m.as_str()), module, "{u}");
        assert_eq!(c.client_type.as_deref().unwrap_or(""), client_type, "{u}");
        assert_eq!(c.model_id.as_deref().unwrap_or(""), model_id, "{u}");
    }
}

/// `MqttUsernameParserTest.ParseUserNameErrorTest` and `NegativeUsernameTest`, plus ours.
#[test]
fn edgehub_refused_usernames() {
    for u in [
        "iotHub1/device1",
        "iotHub1/device1/fooBar",
        "iotHub1/device1/api-version",
        "iotHub1/device1/module1/fooBar",
        "iotHub1/device1/module1/api-version",
        "iotHub1/device1/module1/api-version=2017-06-30/DeviceClientType=Microsoft.Azure.Devices.Client/1.5.1-preview-003/prodInfo",
        "iotHub1/device1/module1/api-version=2017-06-30/DeviceClientType=Microsoft.Azure.Devices.Client",
        "iotHub1/device1/module1",
        "iotHub1/device1/module1?api-version=2010-01-01?DeviceClientType=customDeviceClient1",
        "iotHub1?api-version=2010-01-01&DeviceClientType=customDeviceClient1",
        "iotHub1/device1/module1/?version=2010-01-01&DeviceClientType=customDeviceClient1",
        "iotHub1//?api-version=2010-01-01&DeviceClientType=customDeviceClient1",
        "missingEverythingAfterHostname",
        "hostname/missingEverthingAfterDeviceId",
        "hostname/deviceId/missingApiVersionProperty",
        "hostname/deviceId/moduleId/missingApiVersionProperty",
        "hostname/deviceId/moduleId/stillMissingApiVersionProperty&DeviceClientType=whatever",
        "hostname/deviceId/moduleId/DeviceClientType=whatever&stillMissingApiVersionProperty",
        "hostname/deviceId/moduleId/DeviceClientType=stillMissingApiVersionProperty",
        "hostname/deviceId/moduleId/api-version=whatever/tooManySegments",
        "",
        "   ",
        "h/d/?api-version=",
        "h/d/?api-version=%20",
    ] {
        assert!(username::parse(u).is_err(), "{u:?} should be refused");
    }
}

#[test]
fn empty_module_segment_is_refused_not_taken_for_the_device() {
    assert_eq!(
        username::parse("h/d//?api-version=1"),
        Err(UsernameError::EmptyModuleId)
    );
    assert_eq!(
        username::parse("h/ /?api-version=1"),
        Err(UsernameError::EmptyDeviceId)
    );
}

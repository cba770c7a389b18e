#Requires -RunAsAdministrator
$ErrorActionPreference = 'Stop'
$Group = 'HostIso Isolation'
$SavedProfiles = "$env:ProgramData\HostIso\firewall-profiles.xml"
# Save the profiles once, so release restores what the administrator had.
if (-not (Test-Path $SavedProfiles)) {
    New-Item -ItemType Directory -Force -Path (Split-Path $SavedProfiles) | Out-Null
    Get-NetFirewallProfile | Select-Object Name, DefaultInboundAction, DefaultOutboundAction, AllowInboundRules | Export-Clixml $SavedProfiles
}
Get-NetFirewallRule -Group $Group -ErrorAction SilentlyContinue | Remove-NetFirewallRule
Get-ScheduledTask -TaskPath '\HostIso\' -ErrorAction SilentlyContinue | Unregister-ScheduledTask -Confirm:$false
# Inbound: block all connections, inbound allow rules included; outbound: default block.
Set-NetFirewallProfile -All -Enabled True -DefaultInboundAction Block -AllowInboundRules False -DefaultOutboundAction Block
New-NetFirewallRule -Group $Group -Profile Any -Direction Outbound -Action Allow -DisplayName 'HostIso allow permitted peers' -RemoteAddress @('198.51.100.1', '198.51.100.2')
New-NetFirewallRule -Group $Group -Profile Any -Direction Outbound -Action Allow -DisplayName 'HostIso allow DNS (UDP)' -Protocol UDP -RemotePort 53 -RemoteAddress @('192.0.2.53')
New-NetFirewallRule -Group $Group -Profile Any -Direction Outbound -Action Allow -DisplayName 'HostIso allow DNS (TCP)' -Protocol TCP -RemotePort 53 -RemoteAddress @('192.0.2.53')
New-NetFirewallRule -Group $Group -Profile Any -Direction Outbound -Action Allow -DisplayName 'HostIso allow DHCPv4' -Protocol UDP -LocalPort 68 -RemotePort 67
New-NetFirewallRule -Group $Group -Profile Any -Direction Outbound -Action Allow -DisplayName 'HostIso allow DHCPv6' -Protocol UDP -LocalPort 546 -RemotePort 547
New-NetFirewallRule -Group $Group -Profile Any -Direction Outbound -Action Block -DisplayName 'HostIso block other IPv4' -RemoteAddress @('0.0.0.0/1', '128.0.0.0/2', '192.0.0.0/23', '192.0.2.0/27', '192.0.2.32/28', '192.0.2.48/30', '192.0.2.52/32', '192.0.2.54/31', '192.0.2.56/29', '192.0.2.64/26', '192.0.2.128/25', '192.0.3.0/24', '192.0.4.0/22', '192.0.8.0/21', '192.0.16.0/20', '192.0.32.0/19', '192.0.64.0/18', '192.0.128.0/17', '192.1.0.0/16', '192.2.0.0/15', '192.4.0.0/14', '192.8.0.0/13', '192.16.0.0/12', '192.32.0.0/11', '192.64.0.0/10', '192.128.0.0/9', '193.0.0.0/8', '194.0.0.0/7', '196.0.0.0/7', '198.0.0.0/11', '198.32.0.0/12', '198.48.0.0/15', '198.50.0.0/16', '198.51.0.0/18', '198.51.64.0/19', '198.51.96.0/22', '198.51.100.0/32', '198.51.100.3/32', '198.51.100.4/30', '198.51.100.8/29', '198.51.100.16/28', '198.51.100.32/27', '198.51.100.64/26', '198.51.100.128/25', '198.51.101.0/24', '198.51.102.0/23', '198.51.104.0/21', '198.51.112.0/20', '198.51.128.0/17', '198.52.0.0/14', '198.56.0.0/13', '198.64.0.0/10', '198.128.0.0/9', '199.0.0.0/8', '200.0.0.0/5', '208.0.0.0/4', '224.0.0.0/4', '240.0.0.0/5', '248.0.0.0/6', '252.0.0.0/7', '254.0.0.0/8', '255.0.0.0/9', '255.128.0.0/10', '255.192.0.0/11', '255.224.0.0/12', '255.240.0.0/13', '255.248.0.0/14', '255.252.0.0/15', '255.254.0.0/16', '255.255.0.0/17', '255.255.128.0/18', '255.255.192.0/19', '255.255.224.0/20', '255.255.240.0/21', '255.255.248.0/22', '255.255.252.0/23', '255.255.254.0/24', '255.255.255.0/25', '255.255.255.128/26', '255.255.255.192/27', '255.255.255.224/28', '255.255.255.240/29', '255.255.255.248/30', '255.255.255.252/31', '255.255.255.254/32')
New-NetFirewallRule -Group $Group -Profile Any -Direction Outbound -Action Block -DisplayName 'HostIso block other IPv6' -RemoteAddress @('::/0')
